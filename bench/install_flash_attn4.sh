#!/usr/bin/env bash
# Install flash-attn-4 (an optional benchmark peer) on the GPU machine, which has no package
# registry, from wheels prepared under .whl/ (git-ignored) on a machine that has one:
#
#   pip download --pre -d /tmp/fa4 "flash-attn-4==4.0.0b36"     # then keep, in .whl/:
#   .whl/fa4-cutlass-libs-extracted.tar.xz  the nvidia_cutlass_dsl_libs_cu12 wheel unpacked
#                                           and re-packed with xz (60 MiB; the 92 MB wheel is
#                                           over what one device call carries)
#   .whl/fa4-rest/                          flash_attn_4, nvidia_cutlass_dsl(+libs_base,
#                                           libs_core), apache_tvm_ffi, quack_kernels, einops,
#                                           cuda_bindings, cuda_pathfinder, torch_c_dlpack_ext
#
# Two device calls while the machine stays warm (the wheels are cp311, the GPU's Python):
#   run(carry=[".whl/fa4-cutlass-libs-extracted.tar.xz"], "bash bench/install_flash_attn4.sh libs")
#   run(carry=[".whl/fa4-rest"], "bash bench/install_flash_attn4.sh rest && <benchmark>")
# Nothing in blipfast needs flash-attn; the benchmark skips it when it is not importable.
set -eu
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
case "${1:-}" in
  libs) tar -xJf .whl/fa4-cutlass-libs-extracted.tar.xz -C "$site"
        echo "cutlass-dsl libs unpacked into $site" ;;
  rest) python -m pip install --no-deps --no-index .whl/fa4-rest/*.whl
        python -c "from flash_attn.cute import flash_attn_func; print('flash-attn-4 importable')" ;;
  *) echo "usage: $0 libs|rest"; exit 2 ;;
esac
