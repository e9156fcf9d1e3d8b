//! Regenerates the checked-in code under `src/gen/` from the `.proto` files with protox
//! (a pure-Rust compiler: no protoc needed) and tonic-prost-build, and fails when the
//! result differs from what is committed. A failing run leaves the fresh files in place,
//! so committing them after review fixes the test.

#![allow(clippy::expect_used, reason = "a test: a failed step is a failed test")]

use std::fs;
use std::path::{Path, PathBuf};

const PROTOS: &[&str] = &[
    "spiffe/workload/workload.proto",
    "tessera/types/v1/types.proto",
    "tessera/node/v1/node.proto",
    "tessera/admin/v1/admin.proto",
];

#[test]
fn generated_code_is_up_to_date() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let gen_dir = root.join("src/gen");
    let fresh = tempfile_dir();

    let fds = protox::compile(PROTOS, [&root]).expect("the .proto files compile");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .emit_rerun_if_changed(false)
        .out_dir(&fresh)
        .compile_fds(fds)
        .expect("code generation succeeds");

    let mut stale = Vec::new();
    for entry in fs::read_dir(&fresh).expect("read generated dir") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().expect("file name").to_owned();
        let new = fs::read(&path).expect("read fresh file");
        let committed = gen_dir.join(&name);
        if fs::read(&committed).ok().as_deref() != Some(new.as_slice()) {
            fs::write(&committed, &new).expect("write regenerated file");
            stale.push(name.to_string_lossy().into_owned());
        }
    }
    for entry in fs::read_dir(&gen_dir).expect("read src/gen") {
        let path = entry.expect("dir entry").path();
        if !fresh.join(path.file_name().expect("file name")).exists() {
            stale.push(format!("{} (no longer generated)", path.display()));
        }
    }
    fs::remove_dir_all(&fresh).ok();
    assert!(
        stale.is_empty(),
        "generated code under proto/src/gen was stale and has been rewritten: {stale:?}; \
         review and commit it"
    );
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tessera-proto-gen-{}", std::process::id()));
    fs::remove_dir_all(&dir).ok();
    fs::create_dir_all(&dir).expect("create temp dir");
    assert!(Path::new(&dir).is_dir());
    dir
}
