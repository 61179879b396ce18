#!/bin/sh
# Install the Debian packages the interop tests drive: a private Postfix
# (with Cyrus SASL tools and modules), swaks and msmtp. Runs only as root
# where apt-get exists; elsewhere it says so and succeeds, so the rest of
# the suite still runs (interop tests then skip). Fast when all is present.
set -eu

# libnet-ssleay-perl: swaks needs it for STARTTLS, and it is only a
# Recommends, which --no-install-recommends leaves out.
PACKAGES="postfix sasl2-bin libsasl2-modules swaks libnet-ssleay-perl msmtp"

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1 ||
	! command -v dpkg-query >/dev/null 2>&1; then
	echo "test-deps: not root or no apt-get; not installing $PACKAGES (interop tests will skip)"
	exit 0
fi

missing=""
for package in $PACKAGES; do
	status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
	case "$status" in
	"install ok installed") ;;
	*) missing="$missing $package" ;;
	esac
done

if [ -z "$missing" ]; then
	echo "test-deps: all present ($PACKAGES)"
	exit 0
fi

echo "test-deps: installing$missing"
# "No configuration": no /etc/postfix/main.cf, so the package starts no
# system instance; the tests run their own private ones.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086 # word splitting of the package list is wanted
apt-get install -y -qq --no-install-recommends $missing

# Should a system instance have started all the same (it was preconfigured
# elsewhere), stop it: only if this run installed Postfix, so a developer's
# own mail server is never touched.
case " $missing " in
*" postfix "*)
	if [ -f /etc/postfix/main.cf ] && postfix status >/dev/null 2>&1; then
		echo "test-deps: stopping the system Postfix instance the install started"
		postfix stop || true
	fi
	;;
esac
echo "test-deps: done"
