//! What a `local.model` value names: a local folder or `.gguf` file, or a Hugging Face repo
//! with a revision and a file or quant tag. Fetching a Hub repo is the loader's job
//! (`load::hub`).
//!
//! Spec syntax, as llama.cpp's `-hf` and vLLM accept them:
//! `owner/name` (a safetensors repo), `owner/name:Q4_K_M` (the GGUF file of that quant in
//! a GGUF repo), `owner/name/file.gguf` (one named file); `@revision` may follow the repo.

use std::path::{Path, PathBuf};

/// The local model when none is configured: DeepSeek-R1-Distill-Qwen-1.5B as Q4_K_M GGUF.
pub const DEFAULT_MODEL: &str = "unsloth/DeepSeek-R1-Distill-Qwen-1.5B-GGUF:Q4_K_M";

/// A parsed `local.model` (`--model`) value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    Local(PathBuf),
    Hub {
        repo: String,
        revision: String,
        /// A `.gguf` file name, or a quant tag such as `Q4_K_M` to find one.
        file: Option<HubFile>,
    },
}

/// Which file of a Hub repo: one by name, or the `.gguf` file of a quant tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubFile {
    Named(String),
    Quant(String),
}

impl ModelSpec {
    /// Paths that exist, or look like paths (`/`, `.`, `~`, a `.gguf` file with no repo
    /// part), are local; `owner/name…` is a Hub repo.
    pub fn parse(spec: &Path) -> ModelSpec {
        let text = spec.to_string_lossy();
        let looks_local = spec.exists()
            || text.starts_with('/')
            || text.starts_with('.')
            || text.starts_with('~')
            || text.matches('/').count() == 0;
        if looks_local {
            return ModelSpec::Local(spec.to_path_buf());
        }
        let (rest, revision) = match text.rsplit_once('@') {
            Some((rest, revision)) if !revision.contains('/') || rest.matches('/').count() >= 1 => {
                (rest.to_string(), revision.to_string())
            }
            _ => (text.to_string(), "main".to_string()),
        };
        let mut parts = rest.splitn(3, '/');
        let (owner, name, file) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next(),
        );
        let (name, quant) = match name.split_once(':') {
            Some((name, quant)) => (name, Some(quant.to_string())),
            None => (name, None),
        };
        let file = match (file, quant) {
            (Some(file), _) => Some(HubFile::Named(file.to_string())),
            (None, Some(quant)) => Some(HubFile::Quant(quant)),
            (None, None) => None,
        };
        ModelSpec::Hub {
            repo: format!("{owner}/{name}"),
            revision,
            file,
        }
    }

    /// The name clients use when none is configured: a folder's or file's name, a repo's
    /// name without its `-GGUF` suffix.
    pub fn served_name(&self) -> String {
        match self {
            ModelSpec::Local(path) => {
                let name = if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
                    path.file_stem()
                } else {
                    path.file_name()
                };
                name.map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().to_string())
            }
            ModelSpec::Hub { repo, .. } => {
                let name = repo.rsplit('/').next().unwrap_or(repo);
                name.strip_suffix("-GGUF")
                    .or_else(|| name.strip_suffix("-gguf"))
                    .unwrap_or(name)
                    .to_string()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(repo: &str, revision: &str, file: Option<HubFile>) -> ModelSpec {
        ModelSpec::Hub {
            repo: repo.into(),
            revision: revision.into(),
            file,
        }
    }

    #[test]
    fn specs_parse_as_paths_or_repos() {
        assert_eq!(
            ModelSpec::parse(Path::new("./models/x")),
            ModelSpec::Local("./models/x".into())
        );
        assert_eq!(
            ModelSpec::parse(Path::new("/abs/m.gguf")),
            ModelSpec::Local("/abs/m.gguf".into())
        );
        assert_eq!(
            ModelSpec::parse(Path::new("m.gguf")),
            ModelSpec::Local("m.gguf".into())
        );
        assert_eq!(
            ModelSpec::parse(Path::new("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")),
            hub("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "main", None)
        );
        assert_eq!(
            ModelSpec::parse(Path::new(DEFAULT_MODEL)),
            hub(
                "unsloth/DeepSeek-R1-Distill-Qwen-1.5B-GGUF",
                "main",
                Some(HubFile::Quant("Q4_K_M".into()))
            )
        );
        assert_eq!(
            ModelSpec::parse(Path::new("o/n/sub/f.gguf@v2")),
            hub("o/n", "v2", Some(HubFile::Named("sub/f.gguf".into())))
        );
    }

    #[test]
    fn served_names_drop_extensions_and_suffixes() {
        assert_eq!(
            ModelSpec::parse(Path::new(DEFAULT_MODEL)).served_name(),
            "DeepSeek-R1-Distill-Qwen-1.5B"
        );
        assert_eq!(
            ModelSpec::parse(Path::new("/m/qwen-q4.gguf")).served_name(),
            "qwen-q4"
        );
        assert_eq!(ModelSpec::parse(Path::new("/m/tiny-r1")).served_name(), "tiny-r1");
    }
}
