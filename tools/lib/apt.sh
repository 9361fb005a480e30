# shellcheck shell=bash
# Private apt indexes for tools/setup and tools/vm/kernels, sourced by both.
#
# A private index lives in a directory of its own (sources, lists, cache) and is used
# with the options that apt_private_opts prints, so that looking a package up in
# another suite (sid, experimental, backports) never changes the machine's apt
# configuration or its package lists. The archive's address is never written here:
# it is taken from the machine's own apt sources (apt_host_mirror).

# The URI of the machine's Debian (or Ubuntu) archive: the first URI of an enabled
# source whose suites include this release's codename. Prints nothing if none.
apt_host_mirror() {
    local codename f
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        # deb822: one stanza per blank-line separated block.
        awk -v cn="$codename" '
            function flush() { if (types ~ /(^| )deb( |$)/ && enabled != "no" && (cn == "" || suites ~ ("(^| )" cn "( |$)")) && uri != "") { print uri; found = 1; exit } }
            /^[[:space:]]*$/ { flush(); types = suites = uri = ""; enabled = ""; next }
            /^[[:space:]]*#/ { next }
            tolower($1) == "types:" { $1 = ""; types = $0 }
            tolower($1) == "suites:" { $1 = ""; suites = $0 }
            tolower($1) == "uris:" { uri = $2 }
            tolower($1) == "enabled:" { enabled = tolower($2) }
            END { if (!found) flush() }
        ' "$f" | head -n 1
    done | head -n 1 | grep . && return 0
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        # one-line form: deb [options] URI SUITE COMPONENT...
        sed -E 's/\[[^]]*\]//' "$f" | awk -v cn="$codename" '$1 == "deb" && (cn == "" || $3 == cn) { print $2; exit }'
    done | head -n 1
}

# Print, one per line, the apt options that make apt-get/apt-cache use the private
# index in directory $1 (for mapfile).
apt_private_opts() {
    local d=$1
    printf '%s\n' -c "$d/apt.conf" \
        -o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$d/sources" \
        -o "Dir::State::Lists=$d/lists" -o "Dir::Cache=$d/cache" \
        -o "Dir::Etc::Preferences=/dev/null" -o "Dir::Etc::PreferencesParts=$d/preferences" \
        -o "APT::Sandbox::User=root"
}

# Lay out private index directory $1 with one source: the machine's mirror, suites $2
# (space separated). With $3 = with-host, the machine's own sources are copied in too
# (so that the private index resolves dependencies as the machine does, plus $2).
apt_private_setup() {
    local d=$1 suites=$2 with=${3:-} mirror f
    mirror=$(apt_host_mirror)
    [ -n "$mirror" ] || {
        echo "no Debian/Ubuntu archive found in this machine's apt sources (/etc/apt/sources.list*)" >&2
        return 1
    }
    rm -rf "$d/sources"
    mkdir -p "$d/sources" "$d/lists/partial" "$d/cache/archives/partial" "$d/preferences"
    if [ "$with" = with-host ]; then
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
            [ -f "$f" ] || continue
            case $f in
            *.list) cp "$f" "$d/sources/host-$(basename "$f")" ;;
            *.sources) cp "$f" "$d/sources/host-$(basename "$f")" ;;
            esac
        done
    fi
    cat >"$d/sources/private.sources" <<SRC
Types: deb
URIs: $mirror
Suites: $suites
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    # The host's apt.conf.d hooks (appstream, packagekit, cache cleaners) must not run
    # for a private index, and it needs no DEP-11 metadata or translations.
    cat >"$d/apt.conf" <<'CONF'
#clear APT::Update::Post-Invoke;
#clear APT::Update::Post-Invoke-Success;
#clear DPkg::Post-Invoke;
Acquire::IndexTargets::deb::DEP-11::DefaultEnabled "false";
Acquire::Languages "none";
CONF
}

# Read `apt-get -s install` output on stdin; print one line per package the plan
# would remove or downgrade ("NAME (removed)" / "NAME OLD -> NEW").
apt_plan_harm() {
    local line name old new
    while IFS= read -r line; do
        case $line in
        "Remv "*)
            name=${line#Remv }
            echo "${name%% *} (removed)"
            ;;
        "Inst "*" ["*"] ("*)
            # Inst NAME [OLD] (NEW SUITE [ARCH]) : an upgrade or a downgrade
            name=${line#Inst }
            name=${name%% *}
            old=${line#*\[}
            old=${old%%\]*}
            new=${line#*\] (}
            new=${new%% *}
            if dpkg --compare-versions "$new" lt "$old"; then
                echo "$name $old -> $new"
            fi
            ;;
        esac
    done
}
