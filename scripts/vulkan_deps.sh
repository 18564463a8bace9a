#!/usr/bin/env bash
# Vulkan build dependencies for `python -m loopcpp.build ... --backend vulkan` on Debian/Ubuntu.
#
# 1. The system packages (as root, when missing): glslc and glslang-tools (shader compilers),
#    libvulkan-dev (loader), spirv-headers, mesa-vulkan-drivers (lavapipe, a software Vulkan
#    device to run on when there is no GPU) and vulkan-tools (vulkaninfo).
# 2. Vulkan headers recent enough for the vendored ggml-vulkan: it uses extensions that Debian 12's
#    (1.3.239) and Debian 13's (1.4.309) headers lack (VK_KHR_internally_synchronized_queues, ...).
#    The header-only packages libvulkan-dev and spirv-headers of Debian's development suite are
#    downloaded with apt (a private package list under the cache, the system's apt state is not
#    touched) and unpacked with dpkg -x into $LOOPCPP_CACHE/vulkan-deps, where loopcpp.build looks
#    first. Only headers and CMake files are used from them; the loader stays the system's.
#
# Idempotent: does nothing when the unpacked headers are already there.
set -euo pipefail

CACHE=${LOOPCPP_CACHE:-$HOME/.cache/loopcpp}
DEST=$CACHE/vulkan-deps
SUITE=${VULKAN_DEPS_SUITE:-sid}
# vulkan_core.h must define these (loopcpp/build.py VULKAN_REQUIRED_SYMBOLS)
REQUIRED="VK_KHR_INTERNALLY_SYNCHRONIZED_QUEUES_EXTENSION_NAME VK_VALVE_shader_mixed_float_dot_product VK_NV_cooperative_matrix_decode_vector VK_EXT_layer_settings"

have_headers() {
    local h=$DEST/usr/include/vulkan/vulkan_core.h
    [ -f "$h" ] || return 1
    for s in $REQUIRED; do grep -q "$s" "$h" || return 1; done
    [ -f "$DEST/usr/share/cmake/SPIRV-Headers/SPIRV-HeadersConfig.cmake" ]
}

if ! command -v apt-get > /dev/null; then
    echo "[vulkan_deps] no apt-get: install the LunarG Vulkan SDK (1.4.363 or newer) and set VULKAN_SDK" >&2
    exit 1
fi

# 1. system packages
missing=()
command -v glslc > /dev/null || missing+=(glslc)
command -v glslangValidator > /dev/null || missing+=(glslang-tools)
[ -e /usr/include/vulkan/vulkan.h ] || missing+=(libvulkan-dev)
[ -d /usr/share/cmake/SPIRV-Headers ] || missing+=(spirv-headers)
ls /usr/share/vulkan/icd.d/*.json > /dev/null 2>&1 || missing+=(mesa-vulkan-drivers)
command -v vulkaninfo > /dev/null || missing+=(vulkan-tools)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "[vulkan_deps] as root: apt-get install ${missing[*]}" >&2
        exit 1
    fi
    echo "[vulkan_deps] apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" > /dev/null
fi

# 2. newer headers into the cache
if have_headers; then
    echo "[vulkan_deps] headers already in $DEST ($(grep -m1 'define VK_HEADER_VERSION ' "$DEST/usr/include/vulkan/vulkan_core.h"))"
    exit 0
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/vulkan-deps.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs" "$work/root"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $SUITE main" \
    > "$work/sources.list"
APT_OPTS=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Dir::State::status=/dev/null
          -o APT::Sandbox::User=root -o Debug::NoLocking=1)
echo "[vulkan_deps] reading Debian $SUITE's package list"
apt-get "${APT_OPTS[@]}" update -qq
(cd "$work/debs" && apt-get "${APT_OPTS[@]}" download libvulkan-dev spirv-headers 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
for deb in "$work"/debs/*.deb; do
    echo "[vulkan_deps] unpacking $(basename "$deb")"
    dpkg -x "$deb" "$work/root"
done
mkdir -p "$CACHE"
rm -rf "$DEST.new"
mv "$work/root" "$DEST.new"
rm -rf "$DEST"
mv "$DEST.new" "$DEST"
if ! have_headers; then
    echo "[vulkan_deps] the headers of Debian $SUITE still lack one of: $REQUIRED" >&2
    exit 1
fi
echo "[vulkan_deps] $DEST: $(grep -m1 'define VK_HEADER_VERSION ' "$DEST/usr/include/vulkan/vulkan_core.h")"
