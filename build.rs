//! Build script. The CUDA kernels under kernels/ will be compiled here with nvcc into an
//! embedded fatbin once the CUDA backend lands; until then there is nothing to compile and
//! the crate builds as a pure CPU engine everywhere.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
}
