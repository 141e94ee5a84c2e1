#!/usr/bin/env bash
# Put a job on a fleetq queue with a plain XADD, then wait for its result without polling.
#
# Needs bash and redis-cli (Redis >= 7.0 tools) only; python3 or jq, when present, is used to
# check that PAYLOAD_JSON is JSON. Follows docs/protocol.md:
#
#     ./producer.sh images '{"prompt": "a red fox"}' [TIMEOUT_SECS]
#
# REDIS_URL selects the server (default redis://127.0.0.1:6379). Prints one JSON line
# (id, state, result or error) and exits 0 when the job succeeded, 1 when it ended otherwise,
# 2 when the wait timed out, 3 on bad arguments. A Redis error (server unreachable, library
# not loaded) is reported on stderr with exit code 1 and nothing on stdout.
#
# TIMEOUT_SECS defaults to 30 and may be fractional; 0 waits forever (as BLPOP does).
#
# The payload is passed to redis-cli as one argument ("$payload"), never through eval or an
# unquoted expansion, so shell metacharacters in it are data, not code.
#
# Reading redis-cli's replies: every call uses --no-raw. In that format each array element
# is exactly one line (`N) "value"`, the index right-aligned), strings are quoted with their
# special bytes escaped (\" \\ \n \r \t \a \b \xHH), nil is `(nil)` and an error reply is
# `(error) …`. So values containing newlines or quotes are read back exactly, and an error
# reply is told apart from a value. (--raw prints values bare, one per line: a value with a
# newline would split into two lines, and an error reply looks like a value; redis-cli 7
# exits 0 after an error reply either way.) decode() undoes the quoting. The one assumption
# is that fleetq_status returns a flat array of strings, which it does (protocol §6).
#
# Writing the output: the result is JSON text already (fleetq stores the handler's JSON,
# without line breaks) and is inserted as it is; any line break in it is dropped, which is
# safe because in valid JSON a line break can only be whitespace between tokens. The error
# and the other fields are written as JSON strings with quotes, backslashes and control
# characters escaped (json_string). No jq is needed.

set -euo pipefail

readonly TERMINAL=" succeeded failed dead expired cancelled not_found "
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}

usage() {
    printf '%s\n' "usage: producer.sh QUEUE PAYLOAD_JSON [TIMEOUT_SECS]" \
        "  REDIS_URL selects the server (default redis://127.0.0.1:6379)"
}

bad_args() {
    printf '%s\n' "$1" >&2
    usage >&2
    exit 3
}

# Queue names are 1 to 100 bytes of ASCII letters, digits, '-', '_' and '.' (protocol §1).
valid_queue() {
    local LC_ALL=C
    [[ $1 =~ ^[A-Za-z0-9._-]{1,100}$ ]]
}

# Checks that $1 is one JSON text; prints the reason and returns 1 if not.
check_json() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c '
import json, sys
def constant(name):
    raise ValueError(name + " is not valid JSON")
try:
    json.loads(sys.argv[1], parse_constant=constant)
except ValueError as e:
    print(e)
    sys.exit(1)
' "$1"
    elif command -v jq >/dev/null 2>&1; then
        if ! printf '%s' "$1" | jq -e -s 'length == 1' >/dev/null 2>&1; then
            echo "jq cannot parse it as one JSON value"
            return 1
        fi
    else
        echo "fleetq producer: neither python3 nor jq found; sending PAYLOAD_JSON unchecked" >&2
    fi
}

# Runs one redis-cli command; its reply (in --no-raw format) is left in REPLY_TEXT. Exits 1
# when redis-cli fails (it has already said why on stderr) or when the reply is an error.
# Called directly, never inside $( ), so that its exit ends the script.
REPLY_TEXT=
rcli() {
    if ! REPLY_TEXT=$(redis-cli -u "$REDIS_URL" --no-auth-warning --no-raw "$@"); then
        printf 'fleetq producer: redis-cli %s failed\n' "$1" >&2
        exit 1
    fi
    case $REPLY_TEXT in
    "(error) "*)
        printf 'fleetq producer: Redis error from %s: %s\n' "$1" "${REPLY_TEXT#"(error) "}" >&2
        exit 1
        ;;
    esac
}

# Decodes one --no-raw value (without its `N) ` index) into DECODED.
DECODED=
decode() {
    local s=$1
    case $s in
    '"'*'"')
        s=${s#'"'}
        s=${s%'"'}
        # A quote inside is always written \" and a backslash always \\, so replacing \" by "
        # from the left cannot split a \\ pair; printf %b then undoes \\ \n \r \t \a \b \xHH.
        s=${s//'\"'/'"'}
        printf -v DECODED '%b' "$s"
        ;;
    "(integer) "*) DECODED=${s#"(integer) "} ;;
    "(nil)") DECODED= ;;
    *) DECODED=$s ;;
    esac
}

# Reads a flat [field, value, …] reply into ST_STATE, ST_RESULT and ST_ERROR
# (ST_HAS_RESULT and ST_HAS_ERROR say whether the field was present).
parse_status() {
    local line key='' n=0
    ST_STATE='' ST_RESULT='' ST_ERROR='' ST_HAS_RESULT=0 ST_HAS_ERROR=0
    while IFS= read -r line; do
        if [[ $line =~ ^[[:space:]]*[0-9]+\)[[:space:]](.*)$ ]]; then
            line=${BASH_REMATCH[1]}
        fi
        decode "$line"
        if ((n % 2 == 0)); then
            key=$DECODED
        else
            case $key in
            state) ST_STATE=$DECODED ;;
            result) ST_RESULT=$DECODED ST_HAS_RESULT=1 ;;
            error) ST_ERROR=$DECODED ST_HAS_ERROR=1 ;;
            esac
        fi
        n=$((n + 1))
    done <<<"$1"
    if [[ -z $ST_STATE ]]; then
        printf 'fleetq producer: unexpected status reply: %s\n' "$1" >&2
        exit 1
    fi
}

# $1 as a JSON string (quotes included) in JSON_STR.
JSON_STR=
json_string() {
    local LC_ALL=C # byte by byte: UTF-8 passes through unchanged
    local s=$1 bs=\\ i hex ch
    s=${s//"$bs"/"$bs$bs"}
    s=${s//'"'/"$bs"'"'}
    s=${s//$'\n'/"$bs"n}
    s=${s//$'\r'/"$bs"r}
    s=${s//$'\t'/"$bs"t}
    if [[ $s == *[$'\x01'-$'\x1f']* ]]; then
        for ((i = 1; i < 32; i++)); do
            printf -v hex '%02x' "$i"
            printf -v ch '%b' "\\x$hex"
            s=${s//"$ch"/"$bs"u00$hex}
        done
    fi
    JSON_STR="\"$s\""
}

main() {
    case ${1:-} in -h | --help) usage; exit 0 ;; esac
    if (($# < 2 || $# > 3)); then
        bad_args "expected 2 or 3 arguments, got $#"
    fi
    local queue=$1 payload=$2 timeout=${3:-30} why
    if ! valid_queue "$queue"; then
        bad_args "QUEUE '$queue' is not a valid queue name: use 1 to 100 ASCII letters, digits, '-', '_' or '.'"
    fi
    if ! why=$(check_json "$payload"); then
        bad_args "PAYLOAD_JSON is not valid JSON ($why); pass e.g. '{\"prompt\": \"a red fox\"}'"
    fi
    if ! [[ $timeout =~ ^([0-9]+|[0-9]*\.[0-9]+)$ ]]; then
        bad_args "TIMEOUT_SECS must be a number of seconds >= 0, got '$timeout'"
    fi

    local stream="fleetq:{$queue}:stream"

    # A plain XADD: the entry id is the job id.
    rcli XADD "$stream" '*' payload "$payload"
    decode "$REPLY_TEXT"
    local id=$DECODED
    local notify="fleetq:{$queue}:notify:$id"

    # fleetq_watch registers this caller as a waiter in the same step as it reads the state.
    rcli FCALL fleetq_watch 1 "$stream" "$id"
    parse_status "$REPLY_TEXT"
    if [[ $TERMINAL != *" $ST_STATE "* ]]; then
        rcli BLPOP "$notify" "$timeout"
        if [[ $REPLY_TEXT == "(nil)" ]]; then
            # Seconds as Python's str(float) writes them, so the message matches producer.py.
            local secs=$timeout
            [[ $secs == *.* ]] || secs="$((10#$secs)).0"
            [[ $secs != .* ]] || secs="0$secs"
            json_string "$id"
            local id_json=$JSON_STR
            json_string "job $id did not end within $secs s"
            printf '{"id":%s,"state":"timeout","error":%s}\n' "$id_json" "$JSON_STR"
            exit 2
        fi
        rcli FCALL fleetq_status 1 "$stream" "$id"
        parse_status "$REPLY_TEXT"
    fi

    local out
    json_string "$id"
    out="{\"id\":$JSON_STR"
    json_string "$ST_STATE"
    out+=",\"state\":$JSON_STR"
    if ((ST_HAS_RESULT)); then
        local result=${ST_RESULT//[$'\r\n']/}
        if [[ -z ${result//[[:space:]]/} ]]; then
            json_string "$ST_RESULT" # not JSON (not written by fleetq): pass it on as a string
            result=$JSON_STR
        fi
        out+=",\"result\":$result"
    fi
    if ((ST_HAS_ERROR)); then
        json_string "$ST_ERROR"
        out+=",\"error\":$JSON_STR"
    fi
    printf '%s}\n' "$out"
    [[ $ST_STATE == succeeded ]] && exit 0
    exit 1
}

main "$@"
