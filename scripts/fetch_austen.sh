#!/usr/bin/env bash
# Fetch the six Jane Austen novels (Debian package r-cran-janeaustenr, an R lazy-load database) without
# installing the package (that would pull in R): apt-get download + dpkg-deb -x, then copy the R package folder to
# $QWT_DATA/janeaustenr (default /usr/local/share/qwt-data as root, ~/.cache/qwt-data otherwise), where
# qwt.data.text looks for it. Does nothing if the corpus is already there.
set -euo pipefail
if [ -n "${QWT_DATA:-}" ]; then DATA="$QWT_DATA"
elif [ "$(id -u)" -eq 0 ]; then DATA=/usr/local/share/qwt-data
else DATA="$HOME/.cache/qwt-data"; fi
for d in "$DATA/janeaustenr" /usr/lib/R/site-library/janeaustenr; do
  [ -f "$d/data/Rdata.rdb" ] && [ -f "$d/data/Rdata.rdx" ] && exit 0
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"  # apt's download user must be able to write there
if ! (cd "$tmp" && apt-get download -qq r-cran-janeaustenr 2>/dev/null); then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  (cd "$tmp" && apt-get download -qq r-cran-janeaustenr)
fi
dpkg-deb -x "$tmp"/r-cran-janeaustenr_*.deb "$tmp/root"
mkdir -p "$DATA"
rm -rf "$DATA/.janeaustenr.partial"
cp -r "$tmp/root/usr/lib/R/site-library/janeaustenr" "$DATA/.janeaustenr.partial"
mv "$DATA/.janeaustenr.partial" "$DATA/janeaustenr"
echo "Jane Austen corpus in $DATA/janeaustenr"
