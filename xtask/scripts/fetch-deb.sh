#!/usr/bin/env bash
# Download one package from a Debian suite other than the host's (e.g. trixie-backports)
# without touching the system's apt configuration: apt reads a private sources list,
# lists and cache under $CACHE/apt. Nothing is installed; the caller unpacks the .deb.
#
# usage: fetch-deb.sh CACHE SUITE PKG VERSION          exact Debian version
#        fetch-deb.sh CACHE SUITE PKG --upstream UPVER highest Debian version whose
#                                                      upstream part is UPVER (e.g. 1.95.0)
# Prints the path of the .deb on stdout.
set -euo pipefail

if (($# < 4)); then
	echo "usage: $0 CACHE SUITE PKG VERSION | CACHE SUITE PKG --upstream UPVER" >&2
	exit 2
fi
CACHE=$1 SUITE=$2 PKG=$3
shift 3
if [[ $1 == --upstream ]]; then
	UPVER=${2:?--upstream needs a version}
	VERSION=
else
	VERSION=$1
	UPVER=
fi

APTDIR=$CACHE/apt/$SUITE
DEBS=$CACHE/debs
mkdir -p "$APTDIR/lists/partial" "$APTDIR/archives/partial" "$DEBS"

# shellcheck source=mirror.sh
. "$(dirname "$0")/mirror.sh"
URI=$(mirror_uri)
if [[ -z $URI ]]; then
	echo "fetch-deb: cannot find a Debian mirror URI in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list" >&2
	exit 1
fi
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $URI $SUITE main" >"$APTDIR/sources.list.new"
if ! cmp -s "$APTDIR/sources.list.new" "$APTDIR/sources.list" 2>/dev/null; then
	mv "$APTDIR/sources.list.new" "$APTDIR/sources.list"
	rm -f "$APTDIR/lists/"*_Packages* "$APTDIR/.updated"
else
	rm -f "$APTDIR/sources.list.new"
fi

APT_OPTS=(
	-o "Dir::Etc::SourceList=$APTDIR/sources.list"
	-o "Dir::Etc::SourceParts=/dev/null"
	-o "Dir::State::Lists=$APTDIR/lists"
	-o "Dir::Cache=$APTDIR"
	-o "Dir::Cache::archives=$APTDIR/archives"
	-o "Dir::State::status=/dev/null"
	-o "APT::Get::List-Cleanup=0"
	# Downloading into a root-owned cache dir; the _apt sandbox user could not write there.
	-o "APT::Sandbox::User=root"
)

# Fast path: the exact .deb is already cached, no network needed.
if [[ -n $VERSION ]]; then
	f=$(compgen -G "$DEBS/${PKG}_${VERSION//:/%3a}_*.deb" | head -n1 || true)
	if [[ -n $f ]]; then
		echo "$f"
		exit 0
	fi
fi

update() {
	echo "fetch-deb: apt-get update ($SUITE from $URI)" >&2
	apt-get "${APT_OPTS[@]}" -qq update >&2
	touch "$APTDIR/.updated"
}

available() {
	apt-cache "${APT_OPTS[@]}" madison "$PKG" 2>/dev/null | awk -F'|' '{ gsub(/ /, "", $2); print $2 }'
}

[[ -e $APTDIR/.updated ]] || update
vers=$(available)
if [[ -n $UPVER ]]; then
	pick() { grep -E "^([0-9]+:)?${UPVER//./\\.}([+~-]|$)" <<<"$vers" | head -n1 || true; }
	VERSION=$(pick)
	if [[ -z $VERSION ]]; then
		# The lists may be stale; refresh once before giving up.
		update
		vers=$(available)
		VERSION=$(pick)
	fi
	if [[ -z $VERSION ]]; then
		echo "fetch-deb: $SUITE has no $PKG for upstream version $UPVER; it has: $(echo $vers)" >&2
		exit 1
	fi
	f=$(compgen -G "$DEBS/${PKG}_${VERSION//:/%3a}_*.deb" | head -n1 || true)
	if [[ -n $f ]]; then
		echo "$f"
		exit 0
	fi
elif ! grep -qxF "$VERSION" <<<"$vers"; then
	update
	vers=$(available)
	if ! grep -qxF "$VERSION" <<<"$vers"; then
		echo "fetch-deb: $PKG=$VERSION is not on $URI $SUITE; available: ${vers:-none}" | tr '\n' ' ' >&2
		echo >&2
		exit 1
	fi
fi

echo "fetch-deb: downloading $PKG=$VERSION" >&2
(cd "$DEBS" && apt-get "${APT_OPTS[@]}" -qq download "$PKG=$VERSION" >&2)
f=$(compgen -G "$DEBS/${PKG}_${VERSION//:/%3a}_*.deb" | head -n1 || true)
if [[ -z $f ]]; then
	echo "fetch-deb: apt-get download $PKG=$VERSION produced no .deb in $DEBS" >&2
	exit 1
fi
echo "$f"
