//! include/regmean_gpu.h is cbindgen's output for src/lib.rs with cbindgen.toml: regenerated
//! here, it must equal the committed file (`REGMEAN_BLESS_HEADER=1` rewrites it instead).

use std::path::Path;

#[test]
fn the_committed_header_is_cbindgens_output() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen parses src/lib.rs")
        .write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    let header = crate_dir.join("../include/regmean_gpu.h");
    if std::env::var("REGMEAN_BLESS_HEADER").is_ok_and(|v| v == "1") {
        std::fs::write(&header, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&header).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is not cbindgen's output for capi/src/lib.rs: regenerate it with REGMEAN_BLESS_HEADER=1 cargo test --release -p regmean-gpu-capi --test header",
        header.display()
    );
}
