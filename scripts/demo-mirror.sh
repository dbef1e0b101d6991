# shellcheck shell=bash
# Sourced by scripts/demo.sh (and tests/demo/test_demo_mirror.sh): which Debian mirror
# debootstrap should use on this machine.
#
# demo_debian_mirror [ROOT] prints the first usable Debian archive URI that apt is configured
# with under ROOT (default: /, i.e. /etc/apt), else http://deb.debian.org/debian. It reads, in
# this order, deb822 sources (etc/apt/sources.list.d/debian.sources first, then the other
# *.sources) and one-line sources (etc/apt/sources.list, then sources.list.d/*.list), and
# skips disabled stanzas and security suites. Of the URIs found it takes:
#   http://, https://  as they are;
#   file:/...          a local mirror, when the directory exists under ROOT;
#   mirror+file:PATH   the first http(s) URL listed in the file PATH (official Debian cloud
#                      images point apt at /etc/apt/mirrors/debian.list this way, a method
#                      that debootstrap does not know);
# and nothing else (cdrom:, tor+, mirror+http lists, ...).

demo_mirror_fallback=http://deb.debian.org/debian

# The URIs of one sources file, one per line, in file order.
demo_mirror_uris_deb822() {
        awk '
                function flush() {
                        if (uris != "" && enabled && !security_only)
                                print uris
                        uris = ""; enabled = 1; security_only = 0
                }
                BEGIN { enabled = 1 }
                /^[ \t]*#/ { next }
                /^[ \t]*$/ { flush(); next }
                tolower($1) == "uris:" { for (i = 2; i <= NF; i++) uris = uris (uris == "" ? "" : "\n") $i }
                tolower($1) == "enabled:" { enabled = tolower($2) != "no" }
                tolower($1) == "suites:" {
                        security_only = NF > 1
                        for (i = 2; i <= NF; i++)
                                if ($i !~ /[-\/]security$/) security_only = 0
                }
                END { flush() }
        ' "$1"
}

demo_mirror_uris_oneline() {
        awk '
                $1 != "deb" { next }
                {
                        i = 2
                        if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                        if (i + 1 <= NF && $(i + 1) !~ /[-\/]security$/) print $i
                }
        ' "$1"
}

# The first http(s) URL listed in a mirror list file (one URL per line, optional
# tab-separated metadata after it, '#' comments).
demo_mirror_from_list() {
        awk '/^[ \t]*#/ { next } $1 ~ /^https?:\/\// { print $1; exit }' "$1" 2>/dev/null
}

# The absolute path of a file: URI's path part ("/x", "///x").
demo_mirror_path() {
        local path=$1

        while [ "${path#/}" != "$path" ]; do path=${path#/}; done
        printf '/%s\n' "$path"
}

# Print URI as debootstrap can use it, or nothing.
demo_mirror_usable() {
        local root=$1 uri=$2 path

        case "$uri" in
        http://* | https://*)
                printf '%s\n' "${uri%/}"
                ;;
        file:/*)
                path=$(demo_mirror_path "${uri#file:}")
                [ -d "$root$path" ] && printf '%s\n' "${uri%/}"
                ;;
        mirror+file:/*)
                path=$(demo_mirror_path "${uri#mirror+file:}")
                uri=$(demo_mirror_from_list "$root$path")
                [ -n "$uri" ] && printf '%s\n' "${uri%/}"
                ;;
        esac
        return 0
}

demo_debian_mirror() {
        local root=${1:-} apt f uri found
        local -a files=()

        apt="$root/etc/apt"
        [ -f "$apt/sources.list.d/debian.sources" ] && files+=("deb822:$apt/sources.list.d/debian.sources")
        for f in "$apt"/sources.list.d/*.sources; do
                [ -f "$f" ] && [ "$f" != "$apt/sources.list.d/debian.sources" ] && files+=("deb822:$f")
        done
        [ -f "$apt/sources.list" ] && files+=("oneline:$apt/sources.list")
        for f in "$apt"/sources.list.d/*.list; do
                [ -f "$f" ] && files+=("oneline:$f")
        done
        for f in "${files[@]}"; do
                while read -r uri; do
                        [ -n "$uri" ] || continue
                        # The security archive holds only updates: debootstrap needs the main one.
                        case "$uri" in */debian-security | */debian-security/) continue ;; esac
                        found=$(demo_mirror_usable "$root" "$uri")
                        if [ -n "$found" ]; then
                                printf '%s\n' "$found"
                                return 0
                        fi
                done < <(demo_mirror_uris_"${f%%:*}" "${f#*:}")
        done
        printf '%s\n' "$demo_mirror_fallback"
}
