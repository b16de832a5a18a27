#!/usr/bin/env bash
# Build a real kube-apiserver and kube-controller-manager (v1.20.2) plus etcd (3.4.23) for the
# integration tests, offline from Debian bookworm packages, and cache them.
#
# Why this way (see shared/FACTS.md, "A real Kubernetes API server for tests"): no apiserver binary is
# on PyPI or npm and kind needs Docker; Debian's *source* package `kubernetes` vendors every Go
# dependency, so it builds with nothing but Debian's Go toolchain and rsync.
#
# Contract:
#   - Binaries land in ${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/kube-<key>/bin/ as kube-apiserver,
#     kube-controller-manager and etcd, where <key> is the first 16 hex digits of this script's
#     sha256: editing the script rebuilds, nothing else does.
#   - When that directory exists the script exits at once (no network, no build).
#   - The last line on stdout is the bin directory; everything else goes to stderr.
#   - The system's apt configuration and installed packages are untouched: apt runs with a private
#     sources list, lists and archive cache, and the .debs are unpacked into the build directory.
#   - The build runs in a temporary directory that is removed on exit; the cache directory is
#     published with one rename, so a half-built cache never exists. Concurrent runs serialise on a
#     lock file.
#   - Full build output is kept in <cache>/kube-<key>.build.log; its tail is printed on failure.
# Cost on 2 cores: ~11 minutes, ~2.2 GB of temporary disk, 225 MB cached.
set -euo pipefail

readonly DEBIAN_MIRROR="${KUBETUNE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
readonly DEBIAN_SUITE="bookworm"
readonly DEBIAN_KEYRING="/usr/share/keyrings/debian-archive-keyring.gpg"
readonly KUBE_SOURCE_PACKAGE="kubernetes"      # 1.20.5+really1.20.2 in bookworm, with vendor/
readonly KUBE_VERSION="v1.20.2"
readonly GO_PACKAGES="golang-1.19-go golang-1.19-src"
readonly GO_ROOT_IN_DEB="usr/lib/go-1.19"

log() { printf 'build-kube: %s\n' "$*" >&2; }
die() { printf 'build-kube: ERROR: %s\n' "$*" >&2; exit 1; }
# Anything set -e stops on without a die() of its own still says where and what.
trap 'printf "build-kube: ERROR: line %s: \"%s\" failed\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

script_path="$(readlink -f "${BASH_SOURCE[0]}")"
key="$(sha256sum "$script_path" | cut -c1-16)"
cache_root="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
final_dir="$cache_root/kube-$key"
bin_dir="$final_dir/bin"
build_log="$cache_root/kube-$key.build.log"

if [[ -d "$bin_dir" ]]; then
  echo "$bin_dir"
  exit 0
fi

for tool in apt-get dpkg-deb dpkg-source make flock sha256sum; do
  command -v "$tool" >/dev/null || die "'$tool' is required (this script expects a Debian bookworm machine)"
done
[[ -r "$DEBIAN_KEYRING" ]] || die "$DEBIAN_KEYRING is missing (package debian-archive-keyring)"

mkdir -p "$cache_root"
# One build at a time per cache key; a second caller waits, then finds the published directory.
exec 9>"$cache_root/kube-$key.lock"
flock 9
if [[ -d "$bin_dir" ]]; then
  echo "$bin_dir"
  exit 0
fi

# The work directory sits next to the cache so the final `mv` is a rename on one filesystem.
work="$(mktemp -d "$cache_root/.kube-$key.build.XXXXXX")"
cleanup() {
  # Go's module cache is written read-only; make it removable first.
  chmod -R u+w "$work" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

log "building kube-apiserver, kube-controller-manager $KUBE_VERSION and etcd into $bin_dir"
log "work dir $work; full log in $build_log (about 11 minutes on 2 cores)"
: >"$build_log"

# --- private apt: our own sources, lists and archive cache; the system config is only read ---------
apt_dir="$work/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/sources.list.d"
cat >"$apt_dir/sources.list" <<SOURCES
deb [signed-by=$DEBIAN_KEYRING] $DEBIAN_MIRROR $DEBIAN_SUITE main
deb-src [signed-by=$DEBIAN_KEYRING] $DEBIAN_MIRROR $DEBIAN_SUITE main
SOURCES
apt_opts=(
  -o "Dir::Etc::SourceList=$apt_dir/sources.list"
  -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
  -o "Dir::State::Lists=$apt_dir/lists"
  -o "Dir::Cache::Archives=$apt_dir/archives"
  -o "Dir::Cache::pkgcache="
  -o "Dir::Cache::srcpkgcache="
  # The private directories belong to root; apt's unprivileged download user could not write them.
  -o "APT::Sandbox::User=$(id -un)"
)
log "apt-get update (private lists, $DEBIAN_MIRROR $DEBIAN_SUITE)"
apt-get "${apt_opts[@]}" -qq update >>"$build_log" 2>&1 || die "apt-get update failed; see $build_log"

debs="$work/debs"
tools="$work/tools"
mkdir -p "$debs" "$tools/bin"
need_rsync=0
command -v rsync >/dev/null || need_rsync=1
packages=($GO_PACKAGES etcd-server)
# The kubernetes build copies trees with rsync; use the system's when there is one.
((need_rsync)) && packages+=(rsync libpopt0)
log "downloading ${packages[*]}"
(cd "$debs" && apt-get "${apt_opts[@]}" -qq download "${packages[@]}") >>"$build_log" 2>&1 \
  || die "apt-get download ${packages[*]} failed; see $build_log"
for deb in "$debs"/*.deb; do
  dpkg-deb -x "$deb" "$tools/root"
done

export GOROOT="$tools/root/$GO_ROOT_IN_DEB"
[[ -x "$GOROOT/bin/go" ]] || die "Go toolchain not found at $GOROOT/bin/go after unpacking"
go_version="$("$GOROOT/bin/go" version)"
log "using $go_version"
# No `| head` under pipefail: the writer's SIGPIPE would end the script without a word.
etcd_version="$("$tools/root/usr/bin/etcd" --version)"
etcd_version="${etcd_version%%$'\n'*}"
log "using $etcd_version"

if ((need_rsync)); then
  libdir="$(dirname "$(find "$tools/root" -name 'libpopt.so.0' -print -quit)")"
  cat >"$tools/bin/rsync" <<WRAPPER
#!/bin/sh
LD_LIBRARY_PATH="$libdir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$tools/root/usr/bin/rsync" "\$@"
WRAPPER
  chmod +x "$tools/bin/rsync"
  "$tools/bin/rsync" --version >/dev/null 2>>"$build_log" \
    || die "the unpacked rsync does not run (missing shared libraries?); see $build_log"
fi

# --- kubernetes source, with Debian's patches applied ----------------------------------------------
log "downloading and unpacking source package $KUBE_SOURCE_PACKAGE"
src_parent="$work/src"
mkdir -p "$src_parent"
(cd "$src_parent" && apt-get "${apt_opts[@]}" -qq source --download-only "$KUBE_SOURCE_PACKAGE") >>"$build_log" 2>&1 \
  || die "apt-get source $KUBE_SOURCE_PACKAGE failed; see $build_log"
dsc="$(find "$src_parent" -maxdepth 1 -name "${KUBE_SOURCE_PACKAGE}_*.dsc" -print -quit)"
[[ -n "$dsc" ]] || die "no .dsc downloaded for $KUBE_SOURCE_PACKAGE"
src="$src_parent/kubernetes"
(cd "$src_parent" && dpkg-source -x "$dsc" "$src") >>"$build_log" 2>&1 || die "dpkg-source -x failed; see $build_log"
[[ -d "$src/vendor" ]] || die "$dsc has no vendor/ directory; an offline build is impossible"

# --- reflect2 v1.0.1 -> v1.0.2 map-iteration fix ---------------------------------------------------
# Go 1.18 changed reflect.mapiterinit to fill a caller-allocated iterator instead of returning one.
# Unpatched, the apiserver segfaults the first time it JSON-encodes a map (e.g. a custom resource).
# reflect2 v1.0.1 links to the old signature and crashes at run time (json-iterator, used by the
# apiserver, iterates maps through it); v1.0.2 split the declaration by Go version. We apply that
# upstream change to the vendored copy rather than bumping the module, which GOPATH mode would not
# fetch offline anyway.
r2="$src/vendor/github.com/modern-go/reflect2"
grep -q '^func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer) \*hiter$' "$r2/unsafe_link.go" \
  || die "vendored reflect2 is not the expected v1.0.1 (mapiterinit declaration not found in $r2/unsafe_link.go)"
sed -i '/^\/\/ m escapes into the return value, but the caller of mapiterinit$/,/^func mapiterinit(/d' \
  "$r2/unsafe_link.go"
sed -i '/^func (type2 \*UnsafeMapType) UnsafeIterate(obj unsafe.Pointer) MapIterator {$/,/^}$/d' \
  "$r2/unsafe_map.go"
# v1.0.1 declared only the first two hiter fields because the runtime allocated the iterator; now the
# caller allocates it, so the struct must have the runtime's full layout (Go 1.19 runtime/map.go).
sed -i '/^type hiter struct {$/,/^}$/d' "$r2/unsafe_link.go"
cat >>"$r2/unsafe_link.go" <<'GO'

type hiter struct {
	key         unsafe.Pointer
	value       unsafe.Pointer
	t           unsafe.Pointer
	h           unsafe.Pointer
	buckets     unsafe.Pointer
	bptr        unsafe.Pointer
	overflow    *[]unsafe.Pointer
	oldoverflow *[]unsafe.Pointer
	startBucket uintptr
	offset      uint8
	wrapped     bool
	B           uint8
	i           uint8
	bucket      uintptr
	checkBucket uintptr
}
GO
if grep -q 'mapiterinit' "$r2/unsafe_link.go" || grep -q 'UnsafeIterate(obj unsafe.Pointer)' "$r2/unsafe_map.go" \
  || [[ "$(grep -c '^type hiter struct {$' "$r2/unsafe_link.go")" != 1 ]] || ! grep -q 'checkBucket uintptr' "$r2/unsafe_link.go"; then
  die "patching reflect2 in $r2 failed (old mapiterinit/UnsafeIterate left, or hiter not replaced)"
fi
cat >"$r2/go_above_118.go" <<'GO'
//+build go1.18

package reflect2

import (
	"unsafe"
)

// m escapes into the return value, but the caller of mapiterinit
// doesn't let the return value escape.
//go:noescape
//go:linkname mapiterinit reflect.mapiterinit
func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer, it *hiter)

func (type2 *UnsafeMapType) UnsafeIterate(obj unsafe.Pointer) MapIterator {
	var it hiter
	mapiterinit(type2.rtype, *(*unsafe.Pointer)(obj), &it)
	return &UnsafeMapIterator{
		hiter:      &it,
		pKeyRType:  type2.pKeyRType,
		pElemRType: type2.pElemRType,
	}
}
GO
cat >"$r2/go_below_118.go" <<'GO'
//+build !go1.18

package reflect2

import (
	"unsafe"
)

// m escapes into the return value, but the caller of mapiterinit
// doesn't let the return value escape.
//go:noescape
//go:linkname mapiterinit reflect.mapiterinit
func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer) (val *hiter)

func (type2 *UnsafeMapType) UnsafeIterate(obj unsafe.Pointer) MapIterator {
	return &UnsafeMapIterator{
		hiter:      mapiterinit(type2.rtype, *(*unsafe.Pointer)(obj)),
		pKeyRType:  type2.pKeyRType,
		pElemRType: type2.pElemRType,
	}
}
GO

# --- build -----------------------------------------------------------------------------------------
# A source package has no .git, so the version is stamped from a file (hack/lib/version.sh).
cat >"$work/version.env" <<VERSION
KUBE_GIT_VERSION='$KUBE_VERSION'
KUBE_GIT_MAJOR='1'
KUBE_GIT_MINOR='20'
KUBE_GIT_TREE_STATE='clean'
VERSION
log "make WHAT=\"cmd/kube-apiserver cmd/kube-controller-manager\" (the slow part)"
start=$SECONDS
(
  cd "$src"
  env -u GOFLAGS -u GOPATH -u GO111MODULE \
    PATH="$tools/bin:$GOROOT/bin:$PATH" \
    GOROOT="$GOROOT" \
    GOCACHE="$work/gocache" \
    GOTOOLCHAIN=local \
    HOME="$work/home" \
    CGO_ENABLED=0 \
    KUBE_GIT_VERSION_FILE="$work/version.env" \
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager"
) >>"$build_log" 2>&1 || {
  tail -n 40 "$build_log" >&2
  die "make failed after $((SECONDS - start)) s; full log in $build_log"
}
log "make finished in $((SECONDS - start)) s"

out="$src/_output/bin"
for binary in kube-apiserver kube-controller-manager; do
  [[ -x "$out/$binary" ]] || die "make succeeded but $out/$binary is missing"
done

# --- publish atomically ----------------------------------------------------------------------------
stage="$work/publish"
mkdir -p "$stage/bin"
cp "$out/kube-apiserver" "$out/kube-controller-manager" "$tools/root/usr/bin/etcd" "$stage/bin/"
"$stage/bin/kube-apiserver" --version >&2 || die "the built kube-apiserver does not run"
{
  echo "kubernetes $KUBE_VERSION from Debian source package $(basename "$dsc" .dsc)"
  echo "$go_version"
  echo "$etcd_version"
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - start)) s"
} >"$stage/BUILDINFO"
mv -T "$stage" "$final_dir"
log "published $bin_dir"
echo "$bin_dir"
