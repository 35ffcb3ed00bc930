//! A snapshot in a file: what `--snapshot` writes when the guest asks
//! (control command 4) and `--restore` reads back into a new VM.
//!
//! ```text
//!  0  magic "KVMUDEVS"
//!  8  version (u32): 2
//! 12  device index (u32): its place in the VMM's device list
//! 16  model name length (u32), then the name (UTF-8)
//!     state length (u32), then the model's state (DeviceModel::save)
//!     VM state length (u64), then the VM's own state (vmstate.rs), if
//!     it was saved (a VM with one vCPU)
//! ```
//!
//! All little-endian. The state is what the device's emulators commit to
//! its state region ([`emulator::state`]); a restored emulator checks it
//! as it checks any state it resumes from (`DeviceModel::restore`).

use std::path::Path;

const MAGIC: [u8; 8] = *b"KVMUDEVS";
const VERSION: u32 = 2;
/// A bound for the name, well above any model's.
const MAX_MODEL_NAME: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not a device snapshot of version {VERSION}: {0}")]
    Format(&'static str),
}

/// One device's saved state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub index: usize,
    pub model: String,
    pub state: Vec<u8>,
    /// The VM's own state ([`crate::vmstate::Machine`], encoded), or
    /// nothing: a new VM then boots its guest afresh.
    pub machine: Vec<u8>,
}

impl Snapshot {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(24 + self.model.len() + self.state.len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(self.index as u32).to_le_bytes());
        b.extend_from_slice(&(self.model.len() as u32).to_le_bytes());
        b.extend_from_slice(self.model.as_bytes());
        b.extend_from_slice(&(self.state.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.state);
        b.extend_from_slice(&(self.machine.len() as u64).to_le_bytes());
        b.extend_from_slice(&self.machine);
        b
    }

    pub fn decode(mut bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
        let mut take = |n: usize, what: &'static str| -> Result<&[u8], SnapshotError> {
            if bytes.len() < n {
                return Err(SnapshotError::Format(what));
            }
            let (head, rest) = bytes.split_at(n);
            bytes = rest;
            Ok(head)
        };
        let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        if take(8, "no magic")? != MAGIC {
            return Err(SnapshotError::Format("a bad magic"));
        }
        if u32_at(take(4, "no version")?) != VERSION {
            return Err(SnapshotError::Format("another version"));
        }
        let index = u32_at(take(4, "no device index")?) as usize;
        let name_len = u32_at(take(4, "no model name")?) as usize;
        if name_len > MAX_MODEL_NAME {
            return Err(SnapshotError::Format("a model name too long"));
        }
        let model = std::str::from_utf8(take(name_len, "a short model name")?)
            .map_err(|_| SnapshotError::Format("a model name not UTF-8"))?
            .to_string();
        let state_len = u32_at(take(4, "no state length")?) as usize;
        let state = take(state_len, "a short state")?.to_vec();
        let machine_len = take(8, "no VM state length")?;
        let machine_len = u64::from_le_bytes(machine_len.try_into().expect("8 bytes"));
        if machine_len != bytes.len() as u64 {
            return Err(SnapshotError::Format("a VM state of another length"));
        }
        Ok(Snapshot {
            index,
            model,
            state,
            machine: bytes.to_vec(),
        })
    }

    pub fn read(path: &Path) -> Result<Snapshot, SnapshotError> {
        let bytes = std::fs::read(path).map_err(|source| SnapshotError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Snapshot::decode(&bytes)
    }

    /// Writes the file whole or not at all: a new file renamed over `path`.
    pub fn write(&self, path: &Path) -> Result<(), SnapshotError> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".new");
        let io = |source| SnapshotError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::write(&tmp, self.encode()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            index: 2,
            model: "edu".into(),
            state: (0..300).map(|i| i as u8).collect(),
            machine: vec![7; 40],
        }
    }

    #[test]
    fn round_trip() {
        let s = snapshot();
        assert_eq!(Snapshot::decode(&s.encode()).unwrap(), s);
        let dir = std::env::temp_dir().join(format!("kvm-userdev-snapshot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("edu.state");
        s.write(&path).unwrap();
        assert_eq!(Snapshot::read(&path).unwrap(), s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_truncation_and_bad_field_is_refused() {
        let good = snapshot().encode();
        for len in 0..good.len() {
            assert!(Snapshot::decode(&good[..len]).is_err(), "{len} bytes");
        }
        let mut longer = good.clone();
        longer.push(0);
        let set = |at: usize, b: &[u8]| {
            let mut v = good.clone();
            v[at..at + b.len()].copy_from_slice(b);
            v
        };
        for bad in [
            longer,
            set(0, b"X"),
            set(8, &1u32.to_le_bytes()),
            set(16, &65u32.to_le_bytes()),
            set(16, &u32::MAX.to_le_bytes()),
            set(20, &[0xff]),
            set(23, &u32::MAX.to_le_bytes()),
        ] {
            assert!(Snapshot::decode(&bad).is_err());
        }
    }
}
