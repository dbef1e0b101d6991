#!/usr/bin/env bash
# Machine-enforced house style (STYLE.md): clang-format clean, no untracked shortcoming
# markers, no banned functions, every header compiles on its own.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
status=0

mapfile -t sources < <(git ls-files '*.c' '*.h')

if ! clang-format --dry-run -Werror "${sources[@]}" 2>/tmp/fim-format.$$; then
        echo "clang-format: files need formatting (run: clang-format -i \$(git ls-files '*.c' '*.h'))"
        grep -E '^[^ ].*: (error|warning)' /tmp/fim-format.$$ | cut -d: -f1 | sort -u | sed 's/^/  /'
        status=1
fi
rm -f /tmp/fim-format.$$

# TODO/FIXME/XXX only with an issue number: TODO(#12).
if grep -nE '\b(TODO|FIXME|XXX)\b' "${sources[@]}" | grep -vE '(TODO|FIXME)\(#[0-9]+\)'; then
        echo "shortcoming markers without an issue number (use TODO(#N): ...)"
        status=1
fi

# Committed comments are /* */ only (a URL's // inside a string is fine).
if grep -nE '^\s*//' "${sources[@]}"; then
        echo "'//' comments are for local debugging only"
        status=1
fi

# 100 columns (STYLE R2). clang-format cannot shorten a line it may not break, so this is
# checked here. A longer line passes only when what makes it long is a string literal, which
# is never split so that a message can be found with grep.
if awk 'length($0) > 100 { t = $0; gsub(/"([^"\\]|\\.)*"/, "\"\"", t);
        if (t == $0 || length(t) > 100) { print FILENAME ":" FNR ": " length($0) " columns"; bad = 1 } }
        END { exit !bad }' "${sources[@]}"; then
        echo "lines over 100 columns (only an unsplit string literal may make a line longer)"
        status=1
fi

# Banned functions (STYLE R20).
if grep -nE '\b(atoi|atol|sprintf|strcpy|strtok|gets)\s*\(|[^_]\bsignal\s*\(' \
        $(git ls-files 'common/*.c' 'config/*.c' 'db/*.c' 'stages/*.c' 'worker/*.c'); then
        echo "banned function used (see STYLE R20)"
        status=1
fi

# A log field never wraps free text in quotes of its own (key="%s", key='%s'): a quote in the
# value would end the field early and let the rest pose as fields. Use log_quote() (log.h).
if perl -0777 -ne 'while (/\blog_(?:debug|info|notice|warning|err|emit|warning_errno|err_errno)\s*\(((?:[^()]|\((?1)\))*)\)/g) {
                my $c = $1; my $at = $-[0];
                if ($c =~ /=\\"%[-.*0-9]*s\\"|='\''%[-.*0-9]*s'\''/) {
                        my $line = 1 + (substr($_, 0, $at) =~ tr/\n//);
                        print "$ARGV:$line: quoted %s in a log field\n";
                }
        }' $(git ls-files 'common/*.c' 'config/*.c' 'db/*.c' 'stages/*.c' 'worker/*.c') | grep .; then
        echo "log fields with free text must go through log_quote()"
        status=1
fi

# Each header compiles on its own.
inc=$(pkg-config --cflags rdkafka libcurl libpq libarchive devmapper json-c)
for h in $(git ls-files 'common/*.h' 'config/*.h' 'db/*.h' 'stages/*.h' 'worker/*.h'); do
        # shellcheck disable=SC2086
        if ! echo "#include \"$h\"" | cc -std=c17 -D_GNU_SOURCE -I. $inc -fsyntax-only -x c - ; then
                echo "header '$h' does not compile on its own"
                status=1
        fi
done

[ "$status" -eq 0 ] && echo "style checks passed"
exit "$status"
