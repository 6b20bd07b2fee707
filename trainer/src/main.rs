//! `mla`: the trainer binary.
fn main() {
    let _ = tch::Cuda::is_available();
}
