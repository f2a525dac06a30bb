//! Connection profiles: a small TOML file (written by `custody init` and `custody dev`), with
//! every field overridable by a `CUSTODY_*` environment variable or a flag.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ClientError;

/// Where and how to connect.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// `https://host:port`
    pub endpoint: Option<String>,
    /// CA certificate (PEM) that signed the server's certificate.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM).
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM).
    pub key_file: Option<PathBuf>,
}

/// A parsed `https://host:port` endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or IP address (without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl Endpoint {
    /// Parses `https://host[:port][/]`.
    pub fn parse(s: &str) -> Result<Self, ClientError> {
        let bad =
            |why: &str| ClientError::Config(format!("endpoint {s:?} is invalid: {why} (expected https://host:port)"));
        let rest = s.strip_prefix("https://").ok_or_else(|| bad("custody only speaks https"))?;
        let authority = rest.trim_end_matches('/');
        if authority.contains('/') || authority.is_empty() {
            return Err(bad("no path is allowed"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            (h.to_string(), after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        let port = port.map_or(Ok(443), |p| p.parse().map_err(|_| bad("bad port")))?;
        Ok(Self { host, port })
    }

    /// `host:port` for the Host header.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}", self.authority())
    }
}

impl Profile {
    /// Reads a profile file. Relative paths inside are taken relative to the file's directory.
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ClientError::Config(format!("cannot read the profile {}: {e}", path.display())))?;
        let mut p: Profile = toml::from_str(&text)
            .map_err(|e| ClientError::Config(format!("the profile {} is invalid: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for f in [&mut p.ca_file, &mut p.cert_file, &mut p.key_file].into_iter().flatten() {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
        Ok(p)
    }

    /// Writes the profile as TOML.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, toml::to_string(self).expect("profiles serialize"))
    }

    /// Fields set in `other` replace ours.
    pub fn overlay(mut self, other: Profile) -> Self {
        if other.endpoint.is_some() {
            self.endpoint = other.endpoint;
        }
        if other.ca_file.is_some() {
            self.ca_file = other.ca_file;
        }
        if other.cert_file.is_some() {
            self.cert_file = other.cert_file;
        }
        if other.key_file.is_some() {
            self.key_file = other.key_file;
        }
        self
    }

    /// The endpoint, parsed.
    pub fn endpoint(&self) -> Result<Endpoint, ClientError> {
        Endpoint::parse(self.endpoint.as_deref().ok_or_else(|| {
            ClientError::Config(
                "no endpoint: pass --endpoint, set CUSTODY_ENDPOINT, or use a profile (CUSTODY_PROFILE)".into(),
            )
        })?)
    }

    /// The CA file.
    pub fn ca_file(&self) -> Result<PathBuf, ClientError> {
        self.ca_file.clone().ok_or_else(|| {
            ClientError::Config(
                "no CA certificate: pass --ca-file, set CUSTODY_CA_FILE, or use a profile (CUSTODY_PROFILE)".into(),
            )
        })
    }

    /// The client certificate and key, if both are set.
    pub fn client_cert(&self) -> Result<Option<(PathBuf, PathBuf)>, ClientError> {
        match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Ok(Some((c.clone(), k.clone()))),
            (None, None) => Ok(None),
            _ => Err(ClientError::Config("a client certificate needs both a certificate file and a key file".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            Endpoint::parse("https://127.0.0.1:8443").unwrap(),
            Endpoint { host: "127.0.0.1".into(), port: 8443 }
        );
        assert_eq!(Endpoint::parse("https://kms.example/").unwrap().port, 443);
        let v6 = Endpoint::parse("https://[::1]:9000").unwrap();
        assert_eq!((v6.host.as_str(), v6.port, v6.authority()), ("::1", 9000, "[::1]:9000".to_string()));
        for bad in ["http://x:1", "https://x:port", "https://x/path", "https://"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn relative_paths_are_relative_to_the_profile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("profile.toml");
        std::fs::write(&path, "endpoint = \"https://localhost:1\"\nca_file = \"ca.crt\"\n").unwrap();
        let p = Profile::load(&path).unwrap();
        assert_eq!(p.ca_file.unwrap(), dir.path().join("ca.crt"));
    }
}
