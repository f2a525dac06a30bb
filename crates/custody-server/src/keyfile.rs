//! The development-only key-file seal: the root key in a file, hex-encoded, mode 0600.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use custody_crypto::RootKey;
use zeroize::Zeroizing;

const HEADER: &str = "# custody root key (DEVELOPMENT ONLY: anyone who reads this file can read every key)\n";

/// Writes a new key file (refuses to overwrite one).
pub fn write(path: &Path, root: &RootKey) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    let text = Zeroizing::new(format!("{HEADER}{}\n", hex::encode(root.expose_secret())));
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    crate::sync_parent(path)
}

/// Reads a key file. Refuses files that others can read, like ssh does with private keys.
pub fn read(path: &Path) -> Result<RootKey, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "the key file {} is readable by other users; run: chmod 600 {}",
            path.display(),
            path.display()
        ));
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?,
    );
    let line = text.lines().find(|l| !l.starts_with('#') && !l.trim().is_empty()).unwrap_or("");
    let bytes =
        Zeroizing::new(hex::decode(line.trim()).map_err(|_| format!("{} is not a custody key file", path.display()))?);
    RootKey::from_bytes(&bytes)
        .ok_or_else(|| format!("{} is not a custody key file (expected 32 bytes)", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        let root = RootKey::generate();
        write(&path, &root).unwrap();
        assert_eq!(read(&path).unwrap().expose_secret(), root.expose_secret());
        assert!(write(&path, &root).is_err(), "never overwrites");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read(&path).unwrap_err().contains("chmod 600"));
        std::fs::write(dir.path().join("bad"), "zz").unwrap();
        std::fs::set_permissions(dir.path().join("bad"), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read(&dir.path().join("bad")).unwrap_err().contains("not a custody key file"));
    }
}
