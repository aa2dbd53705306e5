#!/usr/bin/env bash
# System packages the test suite needs, installed from Debian when missing (make test and CI):
# a real PostgreSQL server for the registry's contract tests, a C compiler for the client's int8
# loops (client/kernels/native), and nginx, through which the coordinator publishes the
# SuperLink's Fleet API (coordinator/fleet_proxy.py), and Debian's Chromium with its chromedriver,
# which the dashboard's browser tests drive headless (tests/coordinator/test_dashboard.py).
set -euo pipefail
packages=()
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
    packages+=(postgresql)
fi
command -v cc >/dev/null || packages+=(gcc)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || packages+=(nginx)
[ -x /usr/bin/chromium ] || packages+=(chromium)
[ -x /usr/bin/chromedriver ] || packages+=(chromium-driver)
if [ ${#packages[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    echo "installing system packages the tests need: ${packages[*]}"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"
fi
