//! Tests of the `disk` key manager against real files in temporary directories.

use std::os::unix::fs::{PermissionsExt, symlink};

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use tessera_plugin_sdk::keymanager::SignatureFormat;

use super::*;
use crate::test_support::verifier;

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & PERM_MASK
}

/// The sorted names in `dir`.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn no_temp_files(dir: &Path) {
    let names = names(dir);
    assert!(
        names.iter().all(|n| !n.contains(TEMP_MARKER)),
        "temporary files left: {names:?}"
    );
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
}

fn verify(key: &dyn SigningKey, public_key_der: &[u8], message: &[u8], format: SignatureFormat) {
    let sig = key.sign(message, format).unwrap();
    UnparsedPublicKey::new(verifier(key.key_type(), format), public_key_der)
        .verify(message, &sig)
        .unwrap_or_else(|e| panic!("{} ({}): {e}", key.id(), key.key_type()));
}

fn insecure_problem(err: KeyManagerError) -> (PathBuf, String) {
    match err {
        KeyManagerError::Insecure { path, problem } => (path, problem),
        other => panic!("expected Insecure, got {other:?}"),
    }
}

/// A fresh directory in which `open` will create `keys`.
fn key_dir() -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("keys");
    (root, dir)
}

#[tokio::test]
async fn round_trip_across_reopen_with_exact_modes() {
    let (_root, dir) = key_dir();
    let km = DiskKeyManager::open(&dir).await.unwrap();
    assert_eq!(km.name(), "disk");
    assert_eq!(km.directory(), dir);
    assert_eq!(mode_of(&dir), 0o700);
    assert!(km.list_keys().await.unwrap().is_empty());

    let ca = km.generate_key("x509-ca-a", KeyType::EcP256).await.unwrap();
    let jwt = km.generate_key("jwt-a", KeyType::Rsa2048).await.unwrap();
    let p384 = km.generate_key("p384", KeyType::EcP384).await.unwrap();
    assert_eq!(
        names(&dir),
        ["jwt-a.key", "p384.key", "x509-ca-a.key"],
        "one file per key, no temporary files"
    );
    for name in names(&dir) {
        assert_eq!(mode_of(&dir.join(&name)), 0o600, "{name}");
    }

    // ES256: 64-byte r||s that verifies with ECDSA_P256_SHA256_FIXED.
    let sig = ca.sign(b"header.payload", SignatureFormat::Fixed).unwrap();
    assert_eq!(sig.len(), 64);
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, ca.public_key_der())
        .verify(b"header.payload", &sig)
        .unwrap();

    let before: Vec<(String, Vec<u8>)> = [&ca, &jwt, &p384]
        .iter()
        .map(|k| (k.id().to_owned(), k.public_key_der().to_vec()))
        .collect();
    drop(km);

    let km = DiskKeyManager::open(&dir).await.unwrap();
    let listed = km.list_keys().await.unwrap();
    let ids: Vec<_> = listed.iter().map(|k| k.id()).collect();
    assert_eq!(ids, ["jwt-a", "p384", "x509-ca-a"]);
    for (id, public) in &before {
        let key = km.get_key(id).await.unwrap().unwrap();
        assert_eq!(key.public_key_der(), public.as_slice(), "{id}");
        for format in [SignatureFormat::Asn1Der, SignatureFormat::Fixed] {
            // Signed by the reloaded key, verified with the public key from before.
            verify(key.as_ref(), public, b"after reopen", format);
        }
    }
    assert_eq!(
        km.get_key("jwt-a").await.unwrap().unwrap().key_type(),
        KeyType::Rsa2048
    );
    assert_eq!(mode_of(&dir), 0o700);
}

#[tokio::test]
async fn replace_and_delete() {
    let (_root, dir) = key_dir();
    let km = DiskKeyManager::open(&dir).await.unwrap();
    let old = km.generate_key("ca", KeyType::EcP256).await.unwrap();
    let inode = std::fs::metadata(dir.join("ca.key")).unwrap().ino();
    let new = km.generate_key("ca", KeyType::EcP384).await.unwrap();
    assert_ne!(old.public_key_der(), new.public_key_der());
    assert_ne!(
        std::fs::metadata(dir.join("ca.key")).unwrap().ino(),
        inode,
        "replaced by rename, not rewritten in place"
    );
    assert_eq!(names(&dir), ["ca.key"]);
    assert_eq!(
        km.get_key("ca").await.unwrap().unwrap().public_key_der(),
        new.public_key_der()
    );
    // The old handle still signs with the old key.
    verify(
        old.as_ref(),
        old.public_key_der(),
        b"m",
        SignatureFormat::Asn1Der,
    );

    assert!(km.delete_key("ca").await.unwrap());
    assert!(!km.delete_key("ca").await.unwrap());
    assert!(names(&dir).is_empty());
    assert!(km.get_key("ca").await.unwrap().is_none());
    drop(km);
    let km = DiskKeyManager::open(&dir).await.unwrap();
    assert!(km.list_keys().await.unwrap().is_empty());

    for bad in ["", ".", "..", "../ca", "a/b", "ca.key\0"] {
        assert!(matches!(
            km.generate_key(bad, KeyType::EcP256).await,
            Err(KeyManagerError::InvalidKeyId { .. })
        ));
        assert!(km.delete_key(bad).await.is_err());
    }
    assert!(names(&dir).is_empty());
}

#[tokio::test]
async fn world_readable_key_file_is_refused_on_load() {
    let (_root, dir) = key_dir();
    let km = DiskKeyManager::open(&dir).await.unwrap();
    km.generate_key("ca", KeyType::EcP256).await.unwrap();
    drop(km);
    let path = dir.join("ca.key");
    let contents = std::fs::read(&path).unwrap();

    for mode in [0o644, 0o640, 0o604, 0o666] {
        set_mode(&path, mode);
        let (bad, problem) = insecure_problem(DiskKeyManager::open(&dir).await.unwrap_err());
        assert_eq!(bad, path);
        assert!(problem.contains(&format!("{mode:04o}")), "{problem}");
        // Never repaired.
        assert_eq!(mode_of(&path), mode);
        assert_eq!(std::fs::read(&path).unwrap(), contents);
    }
    set_mode(&path, 0o400);
    DiskKeyManager::open(&dir).await.unwrap();
}

#[tokio::test]
async fn planted_world_readable_key_file_is_refused_then_replaced_not_written_through() {
    let (_root, dir) = key_dir();
    let km = DiskKeyManager::open(&dir).await.unwrap();

    // An attacker's world-readable file at the final name, created after `open`.
    let path = dir.join("ca.key");
    std::fs::write(&path, b"attacker").unwrap();
    set_mode(&path, 0o666);
    let planted_inode = std::fs::metadata(&path).unwrap().ino();
    // ... and at guessable temporary names (SECURITY.md §3.5 item 50).
    for tmp in [".ca.key.tmp", ".ca.key.tmp-0", "ca.key.tmp"] {
        std::fs::write(dir.join(tmp), b"attacker").unwrap();
        set_mode(&dir.join(tmp), 0o666);
    }

    let key = km.generate_key("ca", KeyType::EcP256).await.unwrap();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(meta.mode() & PERM_MASK, 0o600);
    assert_ne!(meta.ino(), planted_inode, "a new file, not the planted one");
    for tmp in [".ca.key.tmp", ".ca.key.tmp-0", "ca.key.tmp"] {
        assert_eq!(std::fs::read(dir.join(tmp)).unwrap(), b"attacker");
    }
    drop(km);

    let km = DiskKeyManager::open(&dir).await.unwrap();
    assert_eq!(
        km.get_key("ca").await.unwrap().unwrap().public_key_der(),
        key.public_key_der()
    );

    // A world-readable file planted while the server is down is refused at load.
    drop(km);
    let path = dir.join("planted.key");
    std::fs::write(&path, b"attacker").unwrap();
    set_mode(&path, 0o644);
    let (bad, problem) = insecure_problem(DiskKeyManager::open(&dir).await.unwrap_err());
    assert_eq!(bad, path);
    assert!(problem.contains("0644"), "{problem}");
}

#[tokio::test]
async fn symlinks_are_refused_on_load_and_never_followed_on_write() {
    let (root, dir) = key_dir();
    let victim = root.path().join("victim");
    std::fs::write(&victim, b"untouched").unwrap();
    set_mode(&victim, 0o644);

    // Symlink at a key name before open: refused.
    std::fs::create_dir(&dir).unwrap();
    set_mode(&dir, 0o700);
    symlink(&victim, dir.join("ca.key")).unwrap();
    let (bad, problem) = insecure_problem(DiskKeyManager::open(&dir).await.unwrap_err());
    assert_eq!(bad, dir.join("ca.key"));
    assert!(problem.contains("symlink"), "{problem}");
    std::fs::remove_file(dir.join("ca.key")).unwrap();

    // Symlinks planted after open, at the final name and at temporary-looking names.
    let km = DiskKeyManager::open(&dir).await.unwrap();
    symlink(&victim, dir.join("ca.key")).unwrap();
    symlink(&victim, dir.join(".ca.key.tmp")).unwrap();
    let zeros = format!(".ca.key{TEMP_MARKER}{}", "0".repeat(2 * TEMP_RANDOM_BYTES));
    symlink(&victim, dir.join(&zeros)).unwrap();

    let key = km.generate_key("ca", KeyType::EcP256).await.unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
    assert_eq!(mode_of(&victim), 0o644);
    let meta = std::fs::symlink_metadata(dir.join("ca.key")).unwrap();
    assert!(meta.file_type().is_file(), "the symlink was replaced");
    assert_eq!(meta.mode() & PERM_MASK, 0o600);

    // Delete removes a symlink itself, never its target.
    symlink(&victim, dir.join("gone.key")).unwrap();
    assert!(km.delete_key("gone").await.unwrap());
    assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
    drop(km);

    // Reopen: the leftover that looks like our temporary file is removed (the link,
    // not the victim); the other name is ignored.
    let km = DiskKeyManager::open(&dir).await.unwrap();
    assert_eq!(
        km.get_key("ca").await.unwrap().unwrap().public_key_der(),
        key.public_key_der()
    );
    assert_eq!(names(&dir), [".ca.key.tmp", "ca.key"]);
    assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
}

#[test]
fn exclusive_create_refuses_any_existing_name() {
    let (_root, dir) = key_dir();
    std::fs::create_dir(&dir).unwrap();
    let handle = open_dir(&dir).unwrap();
    std::fs::write(dir.join("file"), b"attacker").unwrap();
    set_mode(&dir.join("file"), 0o666);
    symlink("/etc/passwd", dir.join("link")).unwrap();
    symlink(dir.join("missing"), dir.join("dangling")).unwrap();
    for name in ["file", "link", "dangling"] {
        assert_eq!(
            open_exclusive(handle.as_fd(), name).unwrap_err(),
            Errno::EEXIST,
            "{name}"
        );
    }
    assert!(
        !dir.join("missing").exists(),
        "a dangling symlink is not followed"
    );
    assert_eq!(std::fs::read(dir.join("file")).unwrap(), b"attacker");
    let fd = open_exclusive(handle.as_fd(), "fresh").unwrap();
    drop(fd);
    assert_eq!(
        mode_of(&dir.join("fresh")) & !0o600,
        0,
        "at most 0600 before fchmod"
    );
}

#[tokio::test]
async fn insecure_key_directories_are_refused_and_not_repaired() {
    let root = tempfile::tempdir().unwrap();
    for mode in [0o755, 0o750, 0o705, 0o701, 0o777] {
        let dir = root.path().join(format!("keys{mode:o}"));
        std::fs::create_dir(&dir).unwrap();
        set_mode(&dir, mode);
        let (bad, problem) = insecure_problem(DiskKeyManager::open(&dir).await.unwrap_err());
        assert_eq!(bad, dir);
        assert!(problem.contains(&format!("{mode:04o}")), "{problem}");
        assert_eq!(mode_of(&dir), mode, "never chmod an existing directory");
        assert!(names(&dir).is_empty());
    }

    // A symlink to a good directory.
    let real = root.path().join("real");
    std::fs::create_dir(&real).unwrap();
    set_mode(&real, 0o700);
    let link = root.path().join("link");
    symlink(&real, &link).unwrap();
    let (bad, problem) = insecure_problem(DiskKeyManager::open(&link).await.unwrap_err());
    assert_eq!(bad, link);
    assert!(problem.contains("symlink"), "{problem}");

    // A regular file.
    let file = root.path().join("file");
    std::fs::write(&file, b"").unwrap();
    assert!(DiskKeyManager::open(&file).await.is_err());

    // A missing parent is not created.
    let err = DiskKeyManager::open(root.path().join("a/b"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("a/b"), "{err}");
}

#[tokio::test]
async fn foreign_owner_is_refused() {
    if !geteuid().is_root() {
        eprintln!("skipped: needs root to chown test files to another uid");
        return;
    }
    let nobody = nix::unistd::Uid::from_raw(65534);
    let (_root, dir) = key_dir();
    let km = DiskKeyManager::open(&dir).await.unwrap();
    km.generate_key("ca", KeyType::EcP256).await.unwrap();
    drop(km);

    let path = dir.join("ca.key");
    nix::unistd::chown(&path, Some(nobody), None).unwrap();
    let (bad, problem) = insecure_problem(DiskKeyManager::open(&dir).await.unwrap_err());
    assert_eq!(bad, path);
    assert!(problem.contains("uid 65534"), "{problem}");
    nix::unistd::chown(&path, Some(geteuid()), None).unwrap();
    DiskKeyManager::open(&dir).await.unwrap();

    nix::unistd::chown(&dir, Some(nobody), None).unwrap();
    let (bad, problem) = insecure_problem(DiskKeyManager::open(&dir).await.unwrap_err());
    assert_eq!(bad, dir);
    assert!(problem.contains("65534"), "{problem}");
}

#[tokio::test]
async fn non_regular_and_corrupt_key_files_are_refused() {
    let (_root, dir) = key_dir();
    drop(DiskKeyManager::open(&dir).await.unwrap());

    // A FIFO: opened non-blocking, refused by fstat, never read.
    let fifo = dir.join("fifo.key");
    nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
    let (bad, problem) = insecure_problem(DiskKeyManager::open(&dir).await.unwrap_err());
    assert_eq!(bad, fifo);
    assert!(problem.contains("not a regular file"), "{problem}");
    std::fs::remove_file(&fifo).unwrap();

    // A directory.
    let sub = dir.join("sub.key");
    std::fs::create_dir(&sub).unwrap();
    set_mode(&sub, 0o700);
    let (bad, _) = insecure_problem(DiskKeyManager::open(&dir).await.unwrap_err());
    assert_eq!(bad, sub);
    std::fs::remove_dir(&sub).unwrap();

    // Garbage, with the right mode.
    let corrupt = dir.join("corrupt.key");
    std::fs::write(&corrupt, b"-----BEGIN PRIVATE KEY-----").unwrap();
    set_mode(&corrupt, 0o600);
    match DiskKeyManager::open(&dir).await.unwrap_err() {
        KeyManagerError::InvalidKeyFile { path, reason } => {
            assert_eq!(path, corrupt);
            assert!(reason.contains("PKCS#8"), "{reason}");
        }
        other => panic!("{other:?}"),
    }

    // A valid key of an unsupported type (RSA 3072).
    let rsa = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa3072).unwrap();
    let der = aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&rsa).unwrap();
    std::fs::write(&corrupt, der.as_ref()).unwrap();
    match DiskKeyManager::open(&dir).await.unwrap_err() {
        KeyManagerError::InvalidKeyFile { path, reason } => {
            assert_eq!(path, corrupt);
            assert!(reason.contains("3072"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    std::fs::remove_file(&corrupt).unwrap();

    // Names that are not keys are ignored; our own leftovers are removed.
    let leftover = format!(".ca.key{TEMP_MARKER}{}", "ab".repeat(TEMP_RANDOM_BYTES));
    for name in ["README", "bad id.key", ".key", &leftover] {
        std::fs::write(dir.join(name), b"x").unwrap();
        set_mode(&dir.join(name), 0o600);
    }
    let km = DiskKeyManager::open(&dir).await.unwrap();
    assert!(km.list_keys().await.unwrap().is_empty());
    assert_eq!(names(&dir), [".key", "README", "bad id.key"]);
}

#[test]
fn names_are_classified() {
    let hex = "0123456789abcdef0123456789abcdef";
    assert_eq!(classify("ca.key"), DirEntry::Key("ca"));
    assert_eq!(classify(".ca.key"), DirEntry::Key(".ca"));
    assert_eq!(
        classify(&format!(".a.key.tmp-{hex}.key")),
        DirEntry::Key(&format!(".a.key.tmp-{hex}")[..]),
        "a valid key id that looks like a temporary name is still a key"
    );
    assert_eq!(classify(&format!(".ca.key.tmp-{hex}")), DirEntry::Temp);
    assert_eq!(classify(&format!("ca.key.tmp-{hex}")), DirEntry::Other);
    assert_eq!(classify(".ca.key.tmp-0"), DirEntry::Other);
    assert_eq!(
        classify(&format!(".ca.key.tmp-{}", hex.to_uppercase())),
        DirEntry::Other
    );
    assert_eq!(classify(".key"), DirEntry::Other);
    assert_eq!(classify("..key"), DirEntry::Other);
    assert_eq!(classify("a b.key"), DirEntry::Other);
    assert_eq!(classify("ca.pem"), DirEntry::Other);
}

#[tokio::test]
async fn directory_made_readable_after_open_refuses_writes() {
    let (_root, dir) = key_dir();
    let km = DiskKeyManager::open(&dir).await.unwrap();
    let key = km.generate_key("ca", KeyType::EcP256).await.unwrap();
    let before = std::fs::read(dir.join("ca.key")).unwrap();
    set_mode(&dir, 0o755);
    let (bad, problem) =
        insecure_problem(km.generate_key("ca", KeyType::EcP256).await.unwrap_err());
    assert_eq!(bad, dir);
    assert!(problem.contains("0755"), "{problem}");
    assert_eq!(std::fs::read(dir.join("ca.key")).unwrap(), before);
    assert_eq!(
        km.get_key("ca").await.unwrap().unwrap().public_key_der(),
        key.public_key_der()
    );
    set_mode(&dir, 0o700);
    km.generate_key("ca", KeyType::EcP256).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_generate_on_one_id_leaves_one_valid_key() {
    let (_root, dir) = key_dir();
    let km = Arc::new(DiskKeyManager::open(&dir).await.unwrap());
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let km = Arc::clone(&km);
            let key_type = if i % 2 == 0 {
                KeyType::EcP256
            } else {
                KeyType::EcP384
            };
            tokio::spawn(async move { km.generate_key("same", key_type).await })
        })
        .collect();
    let mut generated = Vec::new();
    for task in tasks {
        generated.push(task.await.unwrap().unwrap());
    }
    assert_eq!(names(&dir), ["same.key"]);
    assert_eq!(mode_of(&dir.join("same.key")), 0o600);
    let current = km.get_key("same").await.unwrap().unwrap();
    assert!(
        generated
            .iter()
            .any(|k| k.public_key_der() == current.public_key_der())
    );
    drop(km);

    // What is on disk is what was in memory.
    let km = DiskKeyManager::open(&dir).await.unwrap();
    let reloaded = km.get_key("same").await.unwrap().unwrap();
    assert_eq!(reloaded.public_key_der(), current.public_key_der());
    verify(
        reloaded.as_ref(),
        current.public_key_der(),
        b"m",
        SignatureFormat::Fixed,
    );
}

/// Unmounts the test tmpfs even if the test fails.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("cannot unmount {}: {e}", self.0.display());
        }
    }
}

/// Disk full while replacing a key (SECURITY.md §3.5 item 51): the write fails with a
/// clear `Unavailable` error, the previous key file is byte-identical, no temporary file
/// is left, the in-memory key is unchanged, and a retry succeeds once there is space.
#[tokio::test]
async fn full_disk_leaves_the_previous_key_intact() {
    let root = tempfile::tempdir().unwrap();
    let mnt = root.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    if let Err(e) = nix::mount::mount(
        Some("tmpfs"),
        &mnt,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some("size=16k,mode=0700"),
    ) {
        if e == Errno::EPERM {
            eprintln!(
                "skipped: needs root to mount tmpfs (uid {}, mount: {e})",
                geteuid()
            );
            return;
        }
        panic!("mounting a tmpfs at {} failed: {e}", mnt.display());
    }
    let _unmount = Unmount(mnt.clone());

    let dir = mnt.join("keys");
    let km = DiskKeyManager::open(&dir).await.unwrap();
    let key = km.generate_key("ca", KeyType::EcP256).await.unwrap();
    let before = std::fs::read(dir.join("ca.key")).unwrap();

    // Fill the file system.
    let filler_path = mnt.join("filler");
    let mut filler = File::create(&filler_path).unwrap();
    let chunk = [0u8; 1024];
    let full = (0..1024)
        .find_map(|_| filler.write_all(&chunk).err())
        .expect("a 16 KiB tmpfs fills up");
    assert_eq!(full.raw_os_error(), Some(Errno::ENOSPC as i32), "{full}");
    drop(filler);

    for (id, key_type) in [
        ("ca", KeyType::EcP256),
        ("ca", KeyType::EcP384),
        ("other", KeyType::EcP256),
    ] {
        let err = km.generate_key(id, key_type).await.unwrap_err();
        assert!(err.is_unavailable(), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("No space left on device"), "{message}");
        assert!(
            message.contains(&dir.join(format!("{id}.key")).display().to_string()),
            "{message}"
        );
        match &err {
            KeyManagerError::Unavailable {
                source: Some(io), ..
            } => assert_eq!(io.raw_os_error(), Some(Errno::ENOSPC as i32)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(std::fs::read(dir.join("ca.key")).unwrap(), before);
    assert_eq!(names(&dir), ["ca.key"], "no temporary file, no partial key");
    assert_eq!(mode_of(&dir.join("ca.key")), 0o600);
    assert_eq!(
        km.get_key("ca").await.unwrap().unwrap().public_key_der(),
        key.public_key_der()
    );
    assert!(km.get_key("other").await.unwrap().is_none());

    // Space again: the retried rotation succeeds and survives a reopen.
    std::fs::remove_file(&filler_path).unwrap();
    let new = km.generate_key("ca", KeyType::EcP256).await.unwrap();
    assert_ne!(new.public_key_der(), key.public_key_der());
    assert_ne!(std::fs::read(dir.join("ca.key")).unwrap(), before);
    drop(km);
    let km = DiskKeyManager::open(&dir).await.unwrap();
    assert_eq!(
        km.get_key("ca").await.unwrap().unwrap().public_key_der(),
        new.public_key_der()
    );
    no_temp_files(&dir);
}
