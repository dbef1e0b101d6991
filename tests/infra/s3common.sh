# shellcheck shell=bash
# Sourced by s3put.sh, s3get.sh and s3mb.sh: signing and addressing shared by
# the small S3 helpers that seed and inspect the test S3Proxy.
#
# Settings come from the environment (services.env); when S3_ENDPOINT is not
# set, $FIM_SERVICES_DIR/services.env is sourced so the helpers also work
# from a plain shell after `services.sh start`.

if [ -z "${S3_ENDPOINT:-}" ]; then
        _fim_env=${FIM_SERVICES_DIR:-/tmp/fim-services}/services.env
        [ -f "$_fim_env" ] || {
                echo "${0##*/}: S3_ENDPOINT unset and no $_fim_env; run tests/infra/services.sh start s3" >&2
                exit 1
        }
        # shellcheck source=/dev/null
        . "$_fim_env"
fi
: "${AWS_ACCESS_KEY_ID:?}" "${AWS_SECRET_ACCESS_KEY:?}"
: "${AWS_REGION:=us-east-1}"

# curl signs with SigV4 itself, but curl 7.88 sends no x-amz-content-sha256
# header and S3Proxy rejects a v4 request without one. Supplying the header
# makes curl sign it and use its value as the payload hash; UNSIGNED-PAYLOAD
# is valid for any body. (See shared/notes/test-infra.md, section 3.)
s3_curl() {
        curl -sS --aws-sigv4 "aws:amz:$AWS_REGION:s3" \
                -u "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" \
                -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' "$@"
}

# Path-style URL for BUCKET[/KEY]. Each key segment is percent-encoded on its
# own so that '/' stays a separator and the path curl signs is exactly the
# path it sends.
s3_url() {
        local bucket=$1 key=${2-} url seg
        url=${S3_ENDPOINT%/}/$bucket
        if [ -n "$key" ]; then
                local IFS=/
                local -a segs
                read -r -a segs <<<"$key"
                local enc=()
                for seg in "${segs[@]}"; do
                        enc+=("$(jq -rn --arg s "$seg" '$s | @uri')")
                done
                url+=/${enc[*]}
        fi
        printf '%s\n' "$url"
}

# Run s3_curl, print the response body to stderr and fail unless the HTTP
# status is one of the accepted codes (default 200).
s3_request() {
        local accept=$1 out=$2
        shift 2
        local code
        code=$(s3_curl -o "$out" -w '%{http_code}' "$@") || code=000
        case " $accept " in
        *" $code "*) return 0 ;;
        esac
        echo "${0##*/}: HTTP $code" >&2
        [ ! -s "$out" ] || { cat "$out" >&2; echo >&2; }
        return 1
}
