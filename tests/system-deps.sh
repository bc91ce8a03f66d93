#!/usr/bin/env bash
# Installs the Debian packages the test suites talk to, when one is missing (needs root).
set -euo pipefail
need=()
command -v /usr/bin/storescu >/dev/null || need+=(dcmtk)
command -v /usr/sbin/Orthanc >/dev/null || need+=(orthanc)
command -v dciodvfy >/dev/null || need+=(dicom3tools)
[ -f /usr/share/java/pixelmed.jar ] || need+=(libpixelmed-java)
command -v java >/dev/null || need+=(default-jre-headless)
command -v psql >/dev/null || need+=(postgresql-client)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v openssl >/dev/null || need+=(openssl)
command -v strace >/dev/null || need+=(strace)
command -v /usr/bin/chromium >/dev/null || need+=(chromium)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
[ ${#need[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${need[*]}"
if [ "$(id -u)" != 0 ]; then
  echo "not root: install them with: sudo apt-get install ${need[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
