#!/usr/bin/env bash
# Install the fleetbus edge agent on a Debian/Ubuntu or RHEL/Fedora host, as a systemd unit.
#
#   sudo deploy/setup.sh --node-id web-7 --credentials web-7.url --ca ca.pem --trust hub.pub \
#        [--label role=web]... [--policy policy.toml] [--scripts DIR] [--package SPEC]
#
# --credentials is the node's file from `fleet broker-config` (credentials/<node>.url:
# one line, mqtt[s]://node:password@host:port); --ca its tls/ca.pem when the URL is
# mqtts://; --trust the hub's public key from `fleet keys generate` (repeatable).
#
# What it does, each step idempotent (run it again to update):
#   1. OS packages: a Python >= 3.10 with venv (apt-get or dnf/yum), only those missing,
#      without recommends or weak dependencies.
#   2. /opt/fleetbus: a virtualenv with fleetbus (--package: a pip spec or a checkout;
#      default: the checkout this script is in, else "fleetbus").
#   3. /etc/fleet: agent.toml (node id, dirs, trusted keys, labels, policy), agent.env
#      (FLEET_BROKER=<url>, mode 600), ca.pem, trust/*.pub, policy.toml, scripts/.
#   4. /etc/systemd/system/fleet-agent.service (this directory's), enabled and started.
#
# Other options:
#   --prefix P              topic prefix (default fleet/v1)
#   --service-manager M     systemd (default), process or docker
#   --root DIR              write every file under DIR instead of / (images, tests);
#                           implies --no-packages and --no-start
#   --no-packages           skip steps 1 and 2 (fleetbus is already in /opt/fleetbus)
#   --no-start              install the unit but do not enable or start it
set -euo pipefail

readonly OPT=/opt/fleetbus
readonly ETC=/etc/fleet
readonly STATE=/var/lib/fleet-agent
readonly UNIT_DIR=/etc/systemd/system
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "setup.sh: $*" >&2; exit 2; }
say() { echo "setup.sh: $*"; }

node_id="" credentials="" ca="" policy="" scripts="" package="" root=""
prefix="fleet/v1" service_manager="systemd" packages=1 start=1
trust=() labels=()

while [ $# -gt 0 ]; do
    case "$1" in
        --node-id) node_id=${2:?--node-id needs a value}; shift 2 ;;
        --credentials) credentials=${2:?--credentials needs a file}; shift 2 ;;
        --ca) ca=${2:?--ca needs a file}; shift 2 ;;
        --trust) trust+=("${2:?--trust needs a file}"); shift 2 ;;
        --label) labels+=("${2:?--label needs k=v}"); shift 2 ;;
        --policy) policy=${2:?--policy needs a file}; shift 2 ;;
        --scripts) scripts=${2:?--scripts needs a directory}; shift 2 ;;
        --package) package=${2:?--package needs a pip spec}; shift 2 ;;
        --prefix) prefix=${2:?--prefix needs a value}; shift 2 ;;
        --service-manager) service_manager=${2:?--service-manager needs a value}; shift 2 ;;
        --root) root=${2:?--root needs a directory}; packages=0; start=0; shift 2 ;;
        --no-packages) packages=0; shift ;;
        --no-start) start=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

# ------------------------------------------------------------------ checks
[ -n "$node_id" ] || die "--node-id is required"
[[ "$node_id" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] \
    || die "invalid node id '$node_id': letters, digits, '_', '.', '-'; at most 64 characters"
[ -n "$credentials" ] || die "--credentials is required (credentials/$node_id.url from fleet broker-config)"
[ -r "$credentials" ] || die "cannot read $credentials"
url=$(head -n 1 "$credentials" | tr -d '[:space:]')
[[ "$url" =~ ^mqtts?://([^:@/]+):[^@/]+@[^/?]+ ]] \
    || die "$credentials does not hold a broker URL with a user and password"
[ "${BASH_REMATCH[1]}" = "$node_id" ] \
    || die "$credentials is for node '${BASH_REMATCH[1]}', not '$node_id'"
[[ "$prefix" =~ ^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$ ]] || die "invalid topic prefix '$prefix'"
case "$service_manager" in systemd|process|docker) ;; *) die "--service-manager: systemd, process or docker" ;; esac
[ -z "$ca" ] || [ -r "$ca" ] || die "cannot read $ca"
[ -z "$policy" ] || [ -r "$policy" ] || die "cannot read $policy"
[ -z "$scripts" ] || [ -d "$scripts" ] || die "$scripts is not a directory"
for key in ${trust[@]+"${trust[@]}"}; do
    [ -r "$key" ] || die "cannot read $key"
    grep -q -- "-----BEGIN PUBLIC KEY-----" "$key" || die "$key is not a PEM public key"
done
[ ${#trust[@]} -gt 0 ] || say "warning: no --trust key: the agent will reject every command"
for label in ${labels[@]+"${labels[@]}"}; do
    [[ "$label" =~ ^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}=[^\"\\]{0,128}$ ]] \
        || die "invalid label '$label': expected key=value (no quotes or backslashes)"
done
if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (or with --root DIR to write the files elsewhere)"
fi

# The URL names the CA by path: point it at the installed copy.
if [ -n "$ca" ]; then
    [[ "$url" == mqtts://* ]] || die "--ca given, but $credentials is not an mqtts:// URL"
    url="${url%%\?*}?ca=$ETC/ca.pem"
elif [[ "$url" == mqtts://*"?ca="* ]]; then
    die "the URL in $credentials names a CA file (${url##*\?ca=}); pass it with --ca so it is installed"
fi

# ------------------------------------------------------------------ 1. OS packages
find_python() {
    local candidate
    for candidate in python3.13 python3.12 python3.11 python3.10 python3; do
        if command -v "$candidate" >/dev/null \
            && "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

if [ "$packages" = 1 ]; then
    # shellcheck source=/dev/null
    . /etc/os-release
    case " ${ID:-} ${ID_LIKE:-} " in
        *" debian "*|*" ubuntu "*)
            # The venv brings its own pip (python3-venv): no python3-pip, no compilers, no
            # recommends. Nothing is fetched when all of it is installed already.
            missing=()
            for pkg in python3 python3-venv ca-certificates; do
                dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
            done
            if [ ${#missing[@]} -gt 0 ]; then
                export DEBIAN_FRONTEND=noninteractive
                apt-get update -q
                apt-get install -y -q --no-install-recommends "${missing[@]}"
            fi
            ;;
        *" rhel "*|*" fedora "*|*" centos "*)
            pm=$(command -v dnf || command -v yum) || die "neither dnf nor yum found"
            # RHEL 8 and 9 ship an older python3 next to python3.11 in AppStream.
            find_python >/dev/null || "$pm" install -y --setopt=install_weak_deps=False python3.11 \
                || "$pm" install -y --setopt=install_weak_deps=False python3
            ;;
        *) die "unsupported distribution '${ID:-unknown}': Debian/Ubuntu or RHEL/Fedora family" ;;
    esac
    python=$(find_python) || die "no Python >= 3.10 with venv available"

    # ------------------------------------------------------------------ 2. the virtualenv
    if [ -z "$package" ]; then
        if [ -f "$here/../pyproject.toml" ]; then package=$(cd "$here/.." && pwd); else package=fleetbus; fi
    fi
    [ -x "$OPT/bin/python" ] || "$python" -m venv "$OPT"
    # pip's usual settings apply (PIP_INDEX_URL, PIP_NO_INDEX with PIP_FIND_LINKS for an
    # offline wheelhouse, ...).
    "$OPT/bin/python" -m pip install -q --upgrade "$package"
    # The unit runs the agent with PYTHONOPTIMIZE=2: compile for it now, not at every start.
    "$OPT/bin/python" -OO -m compileall -q "$OPT/lib" >/dev/null \
        || say "warning: some modules did not compile for -OO (they compile at first use)"
    say "installed $package into $OPT"
fi

# ------------------------------------------------------------------ 3. /etc/fleet
toml_string() { printf '"%s"' "$1"; }   # callers pass only quote- and backslash-free text

write_file() {  # write_file MODE PATH < content: temp file, then rename
    local mode=$1 path=$2 tmp
    tmp=$(mktemp "$(dirname "$path")/.setup.XXXXXX")
    cat > "$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$path"
}

etc="$root$ETC"
install -d -m 0755 "$etc" "$etc/trust" "$etc/scripts"
install -d -m 0700 "$root$STATE"
install -d -m 0755 "$root$UNIT_DIR"

[ -z "$ca" ] || install -m 0644 "$ca" "$etc/ca.pem"
trust_paths=()
for key in ${trust[@]+"${trust[@]}"}; do
    install -m 0644 "$key" "$etc/trust/$(basename "$key")"
    trust_paths+=("$(toml_string "$ETC/trust/$(basename "$key")")")
done
[ -z "$policy" ] || install -m 0644 "$policy" "$etc/policy.toml"
if [ -n "$scripts" ]; then
    find "$scripts" -maxdepth 1 -type f -exec install -m 0755 {} "$etc/scripts/" \;
fi

label_items=()
for label in ${labels[@]+"${labels[@]}"}; do label_items+=("$(toml_string "$label")"); done

join() { local IFS=,; echo "$*"; }

{
    echo "# fleetbus agent of node $node_id, written by deploy/setup.sh."
    echo "# The broker URL (it holds the node's password) is in agent.env."
    echo "[agent]"
    echo "node_id = $(toml_string "$node_id")"
    echo "prefix = $(toml_string "$prefix")"
    echo "state_dir = $(toml_string "$STATE")"
    echo "scripts_dir = $(toml_string "$ETC/scripts")"
    echo "service_manager = $(toml_string "$service_manager")"
    echo "trust = [$(join ${trust_paths[@]+"${trust_paths[@]}"})]"
    echo "labels = [$(join ${label_items[@]+"${label_items[@]}"})]"
    if [ -n "$policy" ]; then echo "policy = $(toml_string "$ETC/policy.toml")"; fi
} | write_file 0644 "$etc/agent.toml"

(umask 077 && printf 'FLEET_BROKER=%s\n' "$url" | write_file 0600 "$etc/agent.env")

# ------------------------------------------------------------------ 4. the unit
[ -r "$here/fleet-agent.service" ] || die "fleet-agent.service not found next to this script"
write_file 0644 "$root$UNIT_DIR/fleet-agent.service" < "$here/fleet-agent.service"
say "node $node_id: $ETC/agent.toml, $ETC/agent.env, $UNIT_DIR/fleet-agent.service${root:+ (under $root)}"

if [ "$start" = 1 ]; then
    systemctl daemon-reload
    systemctl enable fleet-agent.service
    systemctl restart fleet-agent.service
    say "fleet-agent started: journalctl -u fleet-agent -f"
else
    say "not started: systemctl daemon-reload && systemctl enable --now fleet-agent"
fi
