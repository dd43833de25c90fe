//! The machine a bench ran on (CPU, cores, memory, GPU), and the sha256 of model files,
//! so a report says what produced its numbers.

use std::{io::Read, path::Path, process::Command};

use serde::Serialize;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: Option<f64>,
    /// `nvidia-smi` name and memory of each GPU; empty when there is none (or no driver).
    pub gpus: Vec<String>,
    pub os: String,
    pub lifeboat_version: String,
}

impl Machine {
    /// Read `/proc` and ask `nvidia-smi` if it is installed; every field degrades to
    /// "unknown" rather than failing the bench.
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == "model name").then(|| value.trim().to_string())
            })
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_gib = meminfo.lines().find_map(|line| {
            let kib: f64 = line
                .strip_prefix("MemTotal:")?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(kib / 1024.0 / 1024.0)
        });
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            memory_gib,
            gpus: nvidia_gpus(),
            os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
            lifeboat_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

fn nvidia_gpus() -> Vec<String> {
    let output = Command::new("nvidia-smi")
        .args(["--query-gpu=name,memory.total", "--format=csv,noheader"])
        .output();
    match output {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

/// A model file and its digest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelFile {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// Hash a model file (streamed: GGUF files are gigabytes). A model folder (safetensors,
/// config, tokenizer) is hashed as one: each file's name and then its bytes, in name order.
pub fn hash_model_file(path: &Path) -> std::io::Result<ModelFile> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    let mut add = |file: &Path, hasher: &mut Sha256| -> std::io::Result<()> {
        let mut file = std::fs::File::open(file)?;
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                return Ok(());
            }
            bytes += n as u64;
            hasher.update(&buffer[..n]);
        }
    };
    if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)?
            .map(|entry| entry.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        files.retain(|f| f.is_file());
        files.sort();
        for file in files {
            hasher.update(file.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
            add(&file, &mut hasher)?;
        }
    } else {
        add(path, &mut hasher)?;
    }
    let sha256 = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(ModelFile {
        path: path.display().to_string(),
        bytes,
        sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_hashes_to_its_sha256_and_a_folder_to_its_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a.gguf");
        std::fs::write(&file, b"abc").expect("write");
        let hashed = hash_model_file(&file).expect("hash");
        assert_eq!(
            hashed.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hashed.bytes, 3);

        std::fs::write(dir.path().join("config.json"), b"{}").expect("write");
        let folder = hash_model_file(dir.path()).expect("hash folder");
        assert_eq!(folder.bytes, 5);
        assert_eq!(folder.sha256, hash_model_file(dir.path()).expect("again").sha256);
        std::fs::write(dir.path().join("config.json"), b"[]").expect("write");
        assert_ne!(
            folder.sha256,
            hash_model_file(dir.path()).expect("changed").sha256
        );
    }
}
