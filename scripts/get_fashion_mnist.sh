#!/usr/bin/env bash
# Make sure the Fashion-MNIST IDX files are in DIR (default: where Debian's dataset-fashion-mnist puts them).
set -euo pipefail
dir=${1:-/usr/share/datasets/fashion-mnist}
files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
have_all() { for f in "${files[@]}"; do [[ -s $dir/$f ]] || return 1; done; }
have_all && exit 0
if [[ $dir == /usr/share/datasets/fashion-mnist && $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "installing Debian's dataset-fashion-mnist ..."
    apt-get install -y -q --no-install-recommends dataset-fashion-mnist >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends dataset-fashion-mnist >/dev/null; }
    have_all && exit 0
fi
cat >&2 <<MSG
Fashion-MNIST is not in $dir. Either
  - on Debian/Ubuntu as root: apt-get install dataset-fashion-mnist   (files land in /usr/share/datasets/fashion-mnist), or
  - download ${files[*]}
    from the public Fashion-MNIST release (zalandoresearch/fashion-mnist, data/fashion) into a directory
    and pass it: make FASHION_MNIST=/that/dir ...
MSG
exit 1
