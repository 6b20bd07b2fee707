// Link-time setup shared by every crate that runs libtorch code (model, trainer):
// an rpath to the libtorch of `.venv` so binaries and tests run without LD_LIBRARY_PATH,
// and a forced link of libtorch_cuda, which `--as-needed` would otherwise drop
// (no symbol of it is referenced), leaving CUDA silently unavailable.
// trainer/build.rs includes this file.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    if std::path::Path::new(&lib_dir)
        .join("libtorch_cuda.so")
        .exists()
    {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
