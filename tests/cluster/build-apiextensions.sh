#!/usr/bin/env bash
# Build a real Kubernetes 1.36 CRD API server (apiextensions-apiserver v0.36.4) plus etcd 3.5 for the
# CRD-admission tests, offline from Debian sid's Go library packages, and cache them.
#
# Why this way (see shared/FACTS.md, "A current Kubernetes CRD API server (v1.36), offline"): no
# current apiserver binary is reachable here, but Debian sid packages k8s.io/apiextensions-apiserver
# and its whole Go import closure as golang-*-dev source packages. apiextensions-apiserver is the code
# kube-apiserver runs for CustomResourceDefinitions and custom resources (structural schemas,
# defaulting, pruning, CEL x-kubernetes-validations with cost limits, fieldValidation, OpenAPI).
#
# Contract (the same as build-kube.sh):
#   - Binaries land in ${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/apiextensions-<key>/bin/ as
#     apiextensions-apiserver and etcd, where <key> is the first 16 hex digits of the sha256 of this
#     script, the package list (k8s-1.36-packages.txt, exact name=version lines) and the wrapper main
#     (apiextensions-main/main.go): editing any of them rebuilds, nothing else does.
#   - When that directory exists the script exits at once (no network, no build).
#   - The last line on stdout is the bin directory; everything else goes to stderr.
#   - The system's apt configuration and installed packages are untouched: apt runs with a private
#     sources list (Debian sid), lists and archive cache; the .debs are unpacked with dpkg-deb -x into
#     the build directory, never installed.
#   - The build runs in a temporary directory that is removed on exit; the cache directory is
#     published with one rename, so a half-built cache never exists. Concurrent runs serialise on a
#     lock file.
#   - Full build output is kept in <cache>/apiextensions-<key>.build.log; its tail is printed on
#     failure.
# Cost on 2 cores: see tests/cluster/README.md (measured build time and cache size).
set -euo pipefail

readonly DEBIAN_MIRROR="${KUBETUNE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
readonly DEBIAN_SUITE="sid"
readonly DEBIAN_KEYRING="/usr/share/keyrings/debian-archive-keyring.gpg"
readonly K8S_VERSION="v1.36.4"          # golang-k8s-apiextensions-apiserver-dev 0.36.4 == Kubernetes 1.36.4
readonly GO_ROOT_IN_DEB="usr/lib/go-1.26"
readonly MAIN_IMPORT_PATH="kubetune.io/tests/apiextensions-apiserver"

log() { printf 'build-apiextensions: %s\n' "$*" >&2; }
die() { printf 'build-apiextensions: ERROR: %s\n' "$*" >&2; exit 1; }
# Anything set -e stops on without a die() of its own still says where and what.
trap 'printf "build-apiextensions: ERROR: line %s: \"%s\" failed\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

script_path="$(readlink -f "${BASH_SOURCE[0]}")"
here="$(dirname "$script_path")"
package_list="$here/k8s-1.36-packages.txt"
main_go="$here/apiextensions-main/main.go"
[[ -r "$package_list" ]] || die "$package_list is missing"
[[ -r "$main_go" ]] || die "$main_go is missing"
key="$(cat "$script_path" "$package_list" "$main_go" | sha256sum | cut -c1-16)"
cache_root="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
final_dir="$cache_root/apiextensions-$key"
bin_dir="$final_dir/bin"
build_log="$cache_root/apiextensions-$key.build.log"

if [[ -d "$bin_dir" ]]; then
  echo "$bin_dir"
  exit 0
fi

for tool in apt-get dpkg-deb flock sha256sum; do
  command -v "$tool" >/dev/null || die "'$tool' is required (this script expects a Debian machine)"
done
[[ -r "$DEBIAN_KEYRING" ]] || die "$DEBIAN_KEYRING is missing (package debian-archive-keyring)"

mkdir -p "$cache_root"
# One build at a time per cache key; a second caller waits, then finds the published directory.
exec 9>"$cache_root/apiextensions-$key.lock"
flock 9
if [[ -d "$bin_dir" ]]; then
  echo "$bin_dir"
  exit 0
fi

# The work directory sits next to the cache so the final `mv` is a rename on one filesystem.
work="$(mktemp -d "$cache_root/.apiextensions-$key.build.XXXXXX")"
cleanup() {
  chmod -R u+w "$work" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

total_start=$SECONDS
log "building apiextensions-apiserver $K8S_VERSION and etcd into $bin_dir"
log "work dir $work; full log in $build_log (a few minutes on 2 cores)"
: >"$build_log"

# --- private apt: our own sources (sid), lists and archive cache; the system config is only read ----
apt_dir="$work/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
cat >"$apt_dir/sources.list" <<SOURCES
deb [signed-by=$DEBIAN_KEYRING] $DEBIAN_MIRROR $DEBIAN_SUITE main
SOURCES
apt_opts=(
  -o "Dir::Etc::SourceList=$apt_dir/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$apt_dir/lists"
  -o "Dir::Cache=$apt_dir/cache"
  -o "Dir::Cache::Archives=$apt_dir/cache/archives"
  -o "Dir::Cache::pkgcache="
  -o "Dir::Cache::srcpkgcache="
  # The private directories belong to the caller; apt's unprivileged download user could not write them.
  -o "APT::Sandbox::User=$(id -un)"
)
log "apt-get update (private lists, $DEBIAN_MIRROR $DEBIAN_SUITE)"
apt-get "${apt_opts[@]}" -qq update >>"$build_log" 2>&1 || die "apt-get update failed; see $build_log"

# The exact closure: one name=version per line (comments and blank lines allowed).
mapfile -t packages < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$package_list")
((${#packages[@]} > 0)) || die "$package_list lists no packages"
debs="$work/debs"
root="$work/root"
mkdir -p "$debs" "$root"
log "downloading ${#packages[@]} packages listed in $(basename "$package_list")"
dl_start=$SECONDS
(cd "$debs" && apt-get "${apt_opts[@]}" -qq download "${packages[@]}") >>"$build_log" 2>&1 || {
  tail -n 20 "$build_log" >&2
  die "apt-get download failed; a pinned version may have left sid (update $package_list from \
'apt-cache depends --recurse --no-recommends golang-k8s-apiextensions-apiserver-dev'); see $build_log"
}
n_debs="$(find "$debs" -maxdepth 1 -name '*.deb' | wc -l)"
((n_debs == ${#packages[@]})) || die "downloaded $n_debs .debs for ${#packages[@]} listed packages"
log "downloaded $n_debs .debs ($(du -sh "$debs" | cut -f1)) in $((SECONDS - dl_start)) s; unpacking"
for deb in "$debs"/*.deb; do
  dpkg-deb -x "$deb" "$root" >>"$build_log" 2>&1 || die "dpkg-deb -x $(basename "$deb") failed"
done
rm -rf "$debs" "$apt_dir/cache"

goroot="$root/$GO_ROOT_IN_DEB"
gopath="$root/usr/share/gocode"
[[ -x "$goroot/bin/go" ]] || die "Go toolchain not found at $goroot/bin/go after unpacking"
[[ -d "$gopath/src/k8s.io/apiextensions-apiserver" ]] || die "k8s.io/apiextensions-apiserver not in $gopath"
etcd_bin="$root/usr/bin/etcd"
[[ -x "$etcd_bin" ]] || die "etcd not found at $etcd_bin after unpacking"
go_env=(
  env -u GOFLAGS -u GOENV
  PATH="$goroot/bin:$PATH"
  GOROOT="$goroot"
  GOPATH="$gopath"
  # GOPATH mode, as Debian's dh-golang builds: module mode would fight Debian's source layout (its
  # sources import cel.dev/cel-go while the shipped go.mod pins github.com/google/cel-go).
  GO111MODULE=off
  GOPROXY=off
  GOTOOLCHAIN=local
  GOCACHE="$work/gocache"
  HOME="$work/home"
  CGO_ENABLED=0
)
go_version="$("${go_env[@]}" go version)"
log "using $go_version"
# No `| head` under pipefail: the writer's SIGPIPE would end the script without a word.
etcd_version="$("$etcd_bin" --version)"
etcd_version="${etcd_version%%$'\n'*}"
log "using $etcd_version"

# --- build the wrapper main in GOPATH mode ---------------------------------------------------------
main_dir="$gopath/src/$MAIN_IMPORT_PATH"
mkdir -p "$main_dir"
cp "$main_go" "$main_dir/main.go"
major_minor="${K8S_VERSION#v}"
ldflags="-s -w"
ldflags+=" -X k8s.io/component-base/version.gitVersion=$K8S_VERSION"
ldflags+=" -X k8s.io/component-base/version.gitMajor=${major_minor%%.*}"
minor="${major_minor#*.}"
ldflags+=" -X k8s.io/component-base/version.gitMinor=${minor%%.*}"
ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
ldflags+=" -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"
log "go build $MAIN_IMPORT_PATH (the slow part)"
build_start=$SECONDS
(
  cd "$main_dir"
  "${go_env[@]}" go build -trimpath -ldflags "$ldflags" -o "$work/out/apiextensions-apiserver" .
) >>"$build_log" 2>&1 || {
  tail -n 40 "$build_log" >&2
  die "go build failed after $((SECONDS - build_start)) s; full log in $build_log"
}
build_seconds=$((SECONDS - build_start))
log "go build finished in $build_seconds s"

# --- publish atomically ----------------------------------------------------------------------------
stage="$work/publish"
mkdir -p "$stage/bin"
cp "$work/out/apiextensions-apiserver" "$etcd_bin" "$stage/bin/"
server_version="$("$stage/bin/apiextensions-apiserver" --version 2>&1)" \
  || die "the built apiextensions-apiserver does not run: $server_version"
log "built: $server_version"
{
  echo "apiextensions-apiserver $K8S_VERSION ($server_version), wrapper main $MAIN_IMPORT_PATH"
  echo "from Debian $DEBIAN_SUITE packages listed in k8s-1.36-packages.txt (${#packages[@]} packages)"
  echo "$go_version"
  echo "$etcd_version"
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ): go build $build_seconds s, total $((SECONDS - total_start)) s"
  echo "sha256 $(cd "$stage/bin" && sha256sum apiextensions-apiserver etcd | tr '\n' ' ')"
} >"$stage/BUILDINFO"
mv -T "$stage" "$final_dir"
log "published $bin_dir ($(du -sh "$final_dir" | cut -f1)) in $((SECONDS - total_start)) s"
echo "$bin_dir"
