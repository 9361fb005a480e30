# shellcheck shell=bash
# Case results as JSON lines, shared by tools/vm/run, tools/vm/suite, tools/test and
# tools/demo (sourced). A guest prints one line per case (tools/vm/guest/lib.sh `result`):
#   RESULT {"case":"...","status":"pass"|"fail","secs":N,"reason":"..."}
# The host keeps them as JSON lines files, one object per case, with the kernel added.

# results_extract LOG KERNEL_TAG RELEASE: print the results found in console LOG as JSON
# lines, with "tag" and "kernel" added. A RESULT line that is not valid JSON (a kernel
# message written into the middle of it, say) becomes a failure of case "vm".
results_extract() {
    local log=$1 tag=$2 release=$3 line obj
    grep -o -E 'RESULT \{.*' "$log" | while IFS= read -r line; do
        obj=${line#RESULT }
        # up to the last brace: a console line may go on with a kernel message
        case $obj in *\}*) obj=${obj%\}*}\} ;; esac
        if ! jq -c -e --arg t "$tag" --arg k "$release" \
            'select(type == "object" and (.case | type) == "string" and (.status == "pass" or .status == "fail"))
             | . + {tag: $t, kernel: $k}' <<<"$obj" 2>/dev/null; then
            results_record fail vm "$tag" "$release" "unparsable result line: ${obj:0:200}"
        fi
    done
}

# results_record pass|fail CASE TAG RELEASE REASON: one host-side result as a JSON line.
results_record() {
    jq -n -c --arg s "$1" --arg c "$2" --arg t "$3" --arg k "$4" --arg r "$5" \
        '{case: $c, status: $s, secs: 0, reason: $r, tag: $t, kernel: $k}'
}

# results_count FILE... STATUS: how many results in the JSON lines FILEs have STATUS.
results_count() {
    local status=${*: -1}
    local files=("${@:1:$#-1}")
    cat "${files[@]}" 2>/dev/null | jq -s --arg s "$status" '[.[] | select(.status == $s)] | length'
}

# results_show FILE...: one readable line per result.
results_show() {
    cat "$@" 2>/dev/null | jq -r '"\(.status | ascii_upcase) \(.tag // "-") \(.case) (\(.secs)s)" + (if .reason != "" then ": \(.reason)" else "" end)'
}
