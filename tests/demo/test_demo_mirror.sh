#!/usr/bin/env bash
# The Debian mirror scripts/demo.sh hands to debootstrap (scripts/demo-mirror.sh), from fake
# apt configurations: a fresh Debian 12 cloud image (mirror+file: lists), a classic
# sources.list, deb822 with options, disabled and security stanzas, local file: mirrors,
# methods debootstrap cannot use, and nothing at all.
#
# Usage: tests/demo/test_demo_mirror.sh
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../../scripts/demo-mirror.sh
. "$HERE/../../scripts/demo-mirror.sh"

passed=0
failed=0
W=$(mktemp -d /tmp/fim-demo-mirror.XXXXXX)
trap 'rm -rf "$W"' EXIT

# root NAME: a fresh fake root with an empty /etc/apt; prints its path.
root() {
        rm -rf "${W:?}/$1"
        mkdir -p "$W/$1/etc/apt/sources.list.d" "$W/$1/etc/apt/mirrors"
        echo "$W/$1"
}

expect() {
        local name=$1 want=$2 root=$3 got

        got=$(demo_debian_mirror "$root")
        if [ "$got" = "$want" ]; then
                passed=$((passed + 1))
        else
                failed=$((failed + 1))
                echo "FAIL $name: got '$got', want '$want'"
        fi
}

# The official Debian 12 cloud image (genericcloud/nocloud): deb822 pointing at mirror lists.
r=$(root cloud)
cat >"$r/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb deb-src
URIs: mirror+file:///etc/apt/mirrors/debian.list
Suites: bookworm bookworm-updates bookworm-backports
Components: main

Types: deb deb-src
URIs: mirror+file:///etc/apt/mirrors/debian-security.list
Suites: bookworm-security
Components: main
EOF
printf '# comment\nhttps://deb.debian.org/debian\n' >"$r/etc/apt/mirrors/debian.list"
printf 'https://deb.debian.org/debian-security\n' >"$r/etc/apt/mirrors/debian-security.list"
expect "cloud image: first URL of the mirror list" https://deb.debian.org/debian "$r"

# The same, the list naming a cloud provider's mirror with apt's metadata after a tab.
printf 'http://cdn-aws.deb.debian.org/debian/\tpriority:1\nhttps://deb.debian.org/debian\n' \
        >"$r/etc/apt/mirrors/debian.list"
expect "mirror list with metadata and a trailing slash" http://cdn-aws.deb.debian.org/debian "$r"

# A mirror list that is missing: nothing usable in that stanza, the fallback.
rm "$r/etc/apt/mirrors/debian.list"
expect "mirror list missing" http://deb.debian.org/debian "$r"

# A plain deb822 file (Debian 12 installed from the netinst image).
r=$(root deb822)
cat >"$r/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://ftp.de.debian.org/debian/
Suites: bookworm bookworm-updates
Components: main non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
expect "deb822 http URI" http://ftp.de.debian.org/debian "$r"

# Security first, a disabled stanza, then the archive with two URIs on one line.
r=$(root deb822-order)
cat >"$r/etc/apt/sources.list.d/debian.sources" <<'EOF'
# security updates
Types: deb
URIs: http://security.debian.org/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no

Types: deb
URIs: cdrom:[Debian GNU/Linux 12]/ https://mirror.example/debian
Suites: bookworm
Components: main
EOF
expect "deb822: skips security, disabled stanzas and cdrom:" https://mirror.example/debian "$r"

# A classic one-line sources.list (Debian 11 and earlier, many upgraded hosts).
r=$(root classic)
cat >"$r/etc/apt/sources.list" <<'EOF'
# deb cdrom:[Debian GNU/Linux 12.0.0 _Bookworm_]/ bookworm main
deb http://security.debian.org/debian-security bookworm-security main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://ftp.fr.debian.org/debian/ bookworm main
deb-src http://deb-src.example/debian bookworm main
EOF
expect "classic sources.list with options" http://ftp.fr.debian.org/debian "$r"

# deb822 wins over sources.list; a URI with a method debootstrap cannot use is passed over.
r=$(root both)
printf 'Types: deb\nURIs: tor+http://onion.example/debian\nSuites: bookworm\n\n' \
        >"$r/etc/apt/sources.list.d/debian.sources"
printf 'deb http://classic.example/debian bookworm main\n' >"$r/etc/apt/sources.list"
expect "unusable deb822 method, then sources.list" http://classic.example/debian "$r"

# A local mirror on disk: used when the directory exists, else passed over.
r=$(root local)
printf 'deb file:///srv/mirror/debian bookworm main\ndeb http://after.example/debian bookworm main\n' \
        >"$r/etc/apt/sources.list"
expect "file: mirror that does not exist" http://after.example/debian "$r"
mkdir -p "$r/srv/mirror/debian"
expect "file: mirror that exists" file:///srv/mirror/debian "$r"

# Another *.sources file and a *.list file in sources.list.d.
r=$(root dropins)
printf 'Types: deb\nURIs: http://dropin.example/debian\nSuites: bookworm\n' \
        >"$r/etc/apt/sources.list.d/local.sources"
expect "another *.sources file" http://dropin.example/debian "$r"
r=$(root dropin-list)
printf 'deb https://list.example/debian bookworm main\n' >"$r/etc/apt/sources.list.d/x.list"
expect "a *.list file" https://list.example/debian "$r"

# Nothing configured (a container without apt sources): the fallback.
r=$(root empty)
expect "no sources at all" http://deb.debian.org/debian "$r"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
