# Sourced by fetch-deb.sh and sysroot.sh: prints the host's Debian mirror URI.
# Reuse the host's Debian mirror: the first URI of the deb822 stanza that is not the
# security archive (the machine has no internet besides that mirror).
mirror_uri() {
	local f=/etc/apt/sources.list.d/debian.sources
	if [[ -r $f ]]; then
		awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f"
		return
	fi
	# Legacy one-line format.
	awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' \
		/etc/apt/sources.list 2>/dev/null || true
}

