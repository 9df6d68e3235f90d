#!/usr/bin/env bash
# Builds the Debian package with cargo-deb and checks it without installing it system-wide:
# its contents and paths, the extracted binary's --version, check-config on the extracted example
# config, and maintainer scripts that neither enable nor start the unit. See packaging/README.md.
# Not run by scripts/test or CI: it needs cargo-deb and a release build.
# Exit status: 0 when every check passes, 1 otherwise.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

fail() {
    echo "test-deb: FAIL: $*" >&2
    exit 1
}

# Find or install cargo-deb (into its own root, never system-wide).
CARGO_DEB_ROOT=${CARGO_DEB_ROOT:-/tmp/cargo-deb}
if command -v cargo-deb >/dev/null 2>&1; then
    cargo_deb=$(command -v cargo-deb)
elif [ -x "$CARGO_DEB_ROOT/bin/cargo-deb" ]; then
    cargo_deb=$CARGO_DEB_ROOT/bin/cargo-deb
else
    echo "test-deb: installing cargo-deb into $CARGO_DEB_ROOT" >&2
    cargo install cargo-deb --locked --root "$CARGO_DEB_ROOT"
    cargo_deb=$CARGO_DEB_ROOT/bin/cargo-deb
fi

target_dir=${CARGO_TARGET_DIR:-$repo/target}
export CARGO_TARGET_DIR=$target_dir

work=$(mktemp -d /tmp/adc-test-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT

# Build. The binary is invoked directly (not as "cargo deb") so that it need not be on $PATH.
# TEST_DEB_PACKAGE=FILE checks an existing package instead of building one.
if [ -n "${TEST_DEB_PACKAGE:-}" ]; then
    deb=$TEST_DEB_PACKAGE
else
    deb=$work/arvados-dispatch-cloud.deb
    "$cargo_deb" --output "$deb" || fail "cargo-deb failed"
    echo "test-deb: package built"
fi
[ -f "$deb" ] || fail "no package at $deb"

# Contents.
dpkg-deb -c "$deb" | tee "$work/contents.txt"
for path in \
    ./usr/bin/arvados-dispatch-cloud \
    ./usr/lib/systemd/system/arvados-dispatch-cloud.service \
    ./usr/share/doc/arvados-dispatch-cloud/examples/config.example.yml \
    ./usr/share/doc/arvados-dispatch-cloud/README.md \
    ./usr/share/doc/arvados-dispatch-cloud/install.md; do
    grep -q " $path\$" "$work/contents.txt" || fail "$path is missing from the package"
done
if grep -q ' \./etc/' "$work/contents.txt"; then
    fail "the package installs files under /etc"
fi

# Control fields.
dpkg-deb -f "$deb" Package | grep -qx arvados-dispatch-cloud || fail "wrong Package field"
dpkg-deb -f "$deb" Section | grep -qx admin || fail "wrong Section field"

# Extract into a throwaway root and run the binary from there.
root=$work/root
dpkg -x "$deb" "$root"
bin=$root/usr/bin/arvados-dispatch-cloud
"$bin" --version | grep -q '^arvados-dispatch-cloud ' || fail "--version"
"$bin" check-config --config "$root/usr/share/doc/arvados-dispatch-cloud/examples/config.example.yml" \
    >"$work/check.out" 2>"$work/check.err" || {
    cat "$work/check.err" >&2
    fail "check-config rejected the packaged example config"
}
grep -q 'ExecStart=/usr/bin/arvados-dispatch-cloud serve' \
    "$root/usr/lib/systemd/system/arvados-dispatch-cloud.service" || fail "unit ExecStart"

# Maintainer scripts: the unit must be neither enabled nor started on installation. cargo-deb's
# "dont-enable" fragment re-enables the unit only if it was enabled before (an upgrade), and its
# "restartnostart" fragment only restarts a running unit; the enabling fragment says that
# was-enabled defaults to true, and the starting fragments invoke "start".
dpkg-deb -e "$deb" "$work/control"
grep -q 'deb-systemd-helper debian-installed' "$work/control/postinst" || fail "postinst lacks the dont-enable fragment"
if grep -qs -e 'was-enabled defaults to true' -e 'deb-systemd-invoke start' -e '_dh_action=start' \
    "$work/control/postinst"; then
    fail "postinst enables or starts the unit"
fi

echo "test-deb: OK"
