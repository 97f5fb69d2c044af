"""DEPLOY.md written into every artifact folder (or beside a library-only output): how to load it on its target."""

from __future__ import annotations


def _library_only_text(preset, lib: str, quantization: str) -> str:
    """What a library-only output (``--output NAME.so|.tar|.dylib``) lacks, and how to link a .tar of objects."""
    text = (f"This is the model library alone (MLC `model_lib`). Its weights, mlc-chat-config.json and tokenizer (MLC "
            f"`model`) are any artifact folder of the same model and `--dtype {quantization}` "
            f"(`blockffn-compile --dtype {quantization} -o DIR`; the tensor cache does not depend on the target).\n\n")
    if lib.endswith(".tar") and not preset.system_lib:
        stem = lib.removesuffix(".tar")
        linker = preset.cross_cxx.removeprefix("aarch64-linux-gnu-") if preset.cross_cxx else "g++"
        text += (f"`{lib}` holds object files (gzip tar) to link on the device, with the device's own `{linker}`:\n\n"
                 f"    mkdir {stem}-objs && tar -xf {lib} -C {stem}-objs\n"
                 f"    {linker} -shared -fPIC -o {stem}.so {stem}-objs/*.o\n\n"
                 f"or let TVM link it when loading: `tvm.runtime.load_module(\"{lib}\")` (calls `g++` on the device). "
                 f"Use the resulting `{stem}.so` as `model_lib`.\n\n")
    return text


def deploy_text(preset, manifest: dict, library_only: bool = False) -> str:
    lib = manifest["library"]
    versions = manifest["versions"]
    runtime = f"TVM runtime {versions['tvm']} with tvm-ffi {versions['tvm_ffi']} (the versions this library was built by)"
    head = f"# Deploying `{lib}` ({preset.name}: {preset.description})\n\n"
    if library_only:
        head += f"Needs {runtime}.\n\n" + _library_only_text(preset, lib, manifest["quantization"])
    else:
        head += (f"Artifact: MLC-LLM layout (mlc-chat-config.json, tensor-cache.json + ndarray-cache.json, "
                 f"params_shard_*.bin, tokenizer files) plus `{lib}`. Needs {runtime}.\n\n")
    prefix = manifest.get("system_lib_prefix")
    if preset.name in ("cpu", "cuda"):
        body = (f"On this kind of machine: `blockffn generate --artifact . --device {preset.device} --prompt TEXT` or, "
                f"in Python, `blockffn.runtime.engine.Engine(folder, device=\"{preset.device}\")`.\n"
                f"For the MLC engine: `model` = this folder, `model_lib` = `{lib}`.\n")
    elif preset.device == "cpu":  # cross-compiled CPU library (cpu-aarch64)
        body = (f"Copy the folder to a 64-bit Arm Linux machine (glibc >= 2.28) and install the aarch64 apache-tvm "
                f"and apache-tvm-ffi wheels of the versions above (PyPI has manylinux_2_28_aarch64 wheels). No "
                f"PyTorch or blockffn is needed there: `TVM_USE_RUNTIME_LIB=1 python standalone.py . --tokens 1,2,3 "
                f"--steps 8 --out r.npz` (`blockffn/runtime/standalone.py`) runs greedy prefill + decode; with "
                f"blockffn installed, `blockffn generate --artifact . --prompt TEXT`. The tests run it the same way "
                f"under qemu-aarch64 (tools/build_qemu_sysroot.sh).\n")
    elif preset.name == "jetson":
        body = (f"Copy the {'library' if library_only else 'folder'} to the Jetson (JetPack 6, aarch64). The CUDA "
                "kernels are an sm_87 fatbin compiled at build time, so no nvcc is needed on the device. Build or install "
                "the TVM runtime for aarch64 with CUDA from the same TVM version (the PyPI aarch64 wheel's CUDA runtime "
                f"links libcudart.so.13 / CUDA 13), then load `{lib}` with `tvm.runtime.load_module` (or the MLC engine "
                f"with `model_lib` = `{lib}`).\n")
        if not library_only:
            body += "`blockffn verify .` on the build machine checks the ELF aarch64 objects and the sm_87 fatbin.\n"
    elif preset.device == "opencl":
        body = (f"System library, symbol prefix `{prefix}`. For the MLC Android app: `model_lib` = "
                f"`{prefix.rstrip('_')}` (loaded as `system://{prefix.rstrip('_')}`). Link the objects of `{lib}` into "
                "`libmodel_android.a` (`llvm-ar rcs libmodel_android.a lib0.o *devc.o` from the NDK) and into the app's "
                "runtime with `-Wl,--whole-archive model_android -Wl,--no-whole-archive`. OpenCL C kernels are "
                "compiled by the phone's driver at first load.\n")
    else:  # metal / iphone
        body = (f"System library, symbol prefix `{prefix}`. For the MLC iOS app: `model_lib` = `{prefix.rstrip('_')}` "
                f"(`system://{prefix.rstrip('_')}`); add the objects of `{lib}` to `libmodel_iphone.a` "
                "(`xcrun libtool -static`) and link it into the app. On macOS: "
                "`clang -dynamiclib *.o -framework Metal -framework Foundation -o model.dylib`. Metal Shading Language "
                "source is compiled on the device at load (build on a Mac with Xcode to embed a metallib instead).\n")
    draft = manifest.get("draft")
    if draft and not library_only:
        body += (f"\nSpeculative decoding: `{draft['folder']}/` holds the EAGLE draft head's own library "
                 f"(`{draft['library']}`, built for the same target"
                 + (f", symbol prefix `{prefix}draft_`" if prefix else "")
                 + ") and weights; load it next to the model (MLC: an additional model in eagle mode), or let "
                   "`blockffn generate --artifact . --speculative auto` / `blockffn chat` use it.\n")
    return head + body + (TRUST_LIBRARY if library_only else TRUST_ARTIFACT)


TRUST_ARTIFACT = ("\nTrust: the model library is native code that runs when loaded. `blockffn-manifest.json` records "
                  "its size and sha256, which the blockffn runtime checks before loading it (`blockffn verify .` "
                  "checks everything without loading it); that catches a damaged or mixed-up copy, not a deliberately "
                  "rewritten folder, so deploy only artifacts you built or received from someone you trust.\n")
TRUST_LIBRARY = ("\nTrust: the library is native code that runs when loaded, and a library alone has no manifest to "
                 "pin it; load only libraries you built or received from someone you trust.\n")
