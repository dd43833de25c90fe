//! Model source → ready-to-run model. For a folder, `config.json` picks the architecture,
//! every tensor of the safetensors files (sharded or not) is checked by name and shape,
//! then the tokenizer, chat template and end-of-sequence ids are read; a `.gguf` file goes
//! to [`super::gguf`].

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;

use crate::engine::{
    EngineError,
    models::{self, Arch, CausalLm, Dims},
    text::{chat_template::ChatTemplate, tokenizer::TextTokenizer},
};

/// What the async side needs to prepare prompts (shared, read-only).
#[derive(Debug)]
pub struct ModelInfo {
    pub arch: Arch,
    pub dims: Dims,
    pub tokenizer: TextTokenizer,
    pub template: Option<ChatTemplate>,
    pub eos_ids: Vec<u32>,
    pub bos_id: Option<u32>,
    /// How the weights are stored: tensor counts per dtype or quant type.
    pub weight_types: BTreeMap<String, usize>,
    /// Where the tokenizer comes from and which pre-tokenizer it uses.
    pub tokenizer_source: String,
}

/// A loaded model and its facts.
pub struct Loaded {
    pub model: Box<dyn CausalLm>,
    pub info: ModelInfo,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

fn read_json(path: &Path) -> Result<Value, EngineError> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| EngineError::load(path, format!("cannot read: {err}")))?;
    serde_json::from_str(&text).map_err(|err| EngineError::load(path, format!("invalid JSON: {err}")))
}

/// `source` is a single `.gguf` file rather than a model folder.
pub fn is_gguf(source: &Path) -> bool {
    source.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Check that `source` names a model folder or a `.gguf` file, with a precise message for
/// what it is not.
pub fn check_source(source: &Path) -> Result<(), EngineError> {
    if is_gguf(source) {
        return match std::fs::metadata(source) {
            Ok(meta) if meta.is_file() => Ok(()),
            Ok(_) => Err(EngineError::load(source, "expected a .gguf file, found a folder")),
            Err(err) => Err(EngineError::load(source, format!("cannot open: {err}"))),
        };
    }
    if !source.exists() {
        return Err(EngineError::load(source, "no such file or folder"));
    }
    if !source.is_dir() {
        return Err(EngineError::load(source, "expected a model folder"));
    }
    Ok(())
}

/// The safetensors files of a folder: the shards named by `model.safetensors.index.json`,
/// else every `*.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, EngineError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let value = read_json(&index)?;
        let map = value
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| EngineError::load(&index, "has no `weight_map` object"))?;
        let files: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|err| EngineError::load(dir, format!("cannot list: {err}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(EngineError::load(dir, "no *.safetensors weights in this folder"));
    }
    Ok(files)
}

/// Tensor counts per dtype, from the safetensors headers alone (the weights are not read).
fn safetensors_dtypes(files: &[PathBuf]) -> BTreeMap<String, usize> {
    use std::io::Read;
    let mut counts = BTreeMap::new();
    for file in files {
        let header = std::fs::File::open(file).ok().and_then(|mut f| {
            let mut len = [0u8; 8];
            f.read_exact(&mut len).ok()?;
            // A header over 100 MB is not a safetensors file; the loader says so.
            let len = usize::try_from(u64::from_le_bytes(len))
                .ok()
                .filter(|l| *l < 100 << 20)?;
            let mut text = vec![0u8; len];
            f.read_exact(&mut text).ok()?;
            serde_json::from_slice::<Value>(&text).ok()
        });
        if let Some(Value::Object(tensors)) = header {
            for (name, tensor) in tensors {
                if let (false, Some(dtype)) = (
                    name == "__metadata__",
                    tensor.get("dtype").and_then(Value::as_str),
                ) {
                    *counts.entry(dtype.to_lowercase()).or_insert(0) += 1;
                }
            }
        }
    }
    counts
}

/// Tensors by name, and the file each came from (for error messages).
type TensorsWithOrigin = (HashMap<String, Tensor>, HashMap<String, PathBuf>);

/// Load every tensor, converting to `dtype`; remembers which file each came from.
fn load_tensors(files: &[PathBuf], dtype: DType, device: &Device) -> Result<TensorsWithOrigin, EngineError> {
    let mut tensors = HashMap::new();
    let mut origin = HashMap::new();
    for file in files {
        let loaded = candle_core::safetensors::load(file, device).map_err(|err| {
            EngineError::load(
                file,
                format!("cannot read safetensors (truncated or corrupt?): {err}"),
            )
        })?;
        for (name, tensor) in loaded {
            let tensor = tensor
                .to_dtype(dtype)
                .map_err(|err| EngineError::load(file, format!("tensor {name}: {err}")))?;
            origin.insert(name.clone(), file.clone());
            tensors.insert(name, tensor);
        }
    }
    Ok((tensors, origin))
}

/// End-of-sequence ids from `config.json`, `generation_config.json` and the tokenizer's
/// `eos_token`.
fn eos_ids(
    dir: &Path,
    config: &Value,
    tokenizer: &TextTokenizer,
    tokenizer_config: Option<&Value>,
) -> Vec<u32> {
    let mut ids = BTreeSet::new();
    let mut add = |value: Option<&Value>| match value {
        Some(Value::Number(n)) => {
            if let Some(id) = n.as_u64() {
                ids.insert(id as u32);
            }
        }
        Some(Value::Array(list)) => ids.extend(list.iter().filter_map(Value::as_u64).map(|id| id as u32)),
        _ => {}
    };
    add(config.get("eos_token_id"));
    if let Ok(generation) = read_json(&dir.join("generation_config.json")) {
        add(generation.get("eos_token_id"));
    }
    let eos_token = tokenizer_config.and_then(|c| match c.get("eos_token") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    });
    if let Some(id) = eos_token.and_then(|t| tokenizer.token_id(&t)) {
        ids.insert(id);
    }
    ids.into_iter().collect()
}

/// Read a model's facts without loading weights (`model inspect`, prompt prep).
pub fn read_info(source: &Path) -> Result<ModelInfo, EngineError> {
    check_source(source)?;
    if is_gguf(source) {
        return super::gguf::read_info(source);
    }
    Ok(read_folder_info(source)?.0)
}

/// A folder's facts and its `config.json`.
fn read_folder_info(dir: &Path) -> Result<(ModelInfo, Value), EngineError> {
    check_source(dir)?;
    let config_path = dir.join("config.json");
    let config = read_json(&config_path)?;
    let architectures: Vec<String> = config
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default();
    let arch = Arch::from_architectures(&architectures).map_err(|m| EngineError::load(&config_path, m))?;
    let dims = Dims::from_config(arch, &config).map_err(|m| EngineError::load(&config_path, m))?;
    let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"))?;
    // From the loaded tokenizer: reading tokenizer.json (megabytes) again would slow loads.
    let tokenizer_source = tokenizer.pre_tokenizer_kind().map_or_else(
        || "tokenizer.json".to_string(),
        |kind| format!("tokenizer.json (pre-tokenizer {kind})"),
    );
    let tokenizer_config_path = dir.join("tokenizer_config.json");
    let tokenizer_config = if tokenizer_config_path.exists() {
        Some(read_json(&tokenizer_config_path)?)
    } else {
        None
    };
    let template = match &tokenizer_config {
        Some(c) => ChatTemplate::from_tokenizer_config(c)
            .map_err(|e| EngineError::load(&tokenizer_config_path, e.to_string()))?,
        None => None,
    };
    let eos_ids = eos_ids(dir, &config, &tokenizer, tokenizer_config.as_ref());
    let bos_id = config
        .get("bos_token_id")
        .and_then(Value::as_u64)
        .map(|id| id as u32);
    Ok((
        ModelInfo {
            arch,
            dims,
            tokenizer,
            template,
            eos_ids,
            bos_id,
            weight_types: weight_files(dir)
                .map(|f| safetensors_dtypes(&f))
                .unwrap_or_default(),
            tokenizer_source,
        },
        config,
    ))
}

/// A chat template for the model described by `info` from `source` (`--chat-template`):
/// a `.gguf` file or model folder whose template to take, or a Jinja text file. It is
/// rendered with this model's BOS/EOS tokens, not those of the model it came from.
pub fn template_override(source: &Path, info: &ModelInfo) -> Result<ChatTemplate, EngineError> {
    let text = if is_gguf(source) || source.is_dir() {
        let donor = read_info(source)?;
        donor
            .template
            .map(|t| t.source().to_string())
            .ok_or_else(|| EngineError::load(source, "has no chat template to take"))?
    } else {
        std::fs::read_to_string(source)
            .map_err(|e| EngineError::load(source, format!("cannot read the chat template: {e}")))?
    };
    let (bos, eos) = match &info.template {
        Some(own) => {
            let (bos, eos) = own.special_tokens();
            (bos.to_string(), eos.to_string())
        }
        None => {
            let name = |id: Option<u32>| id.and_then(|id| info.tokenizer.token(id)).unwrap_or_default();
            (name(info.bos_id), name(info.eos_ids.first().copied()))
        }
    };
    ChatTemplate::new(&text, &bos, &eos).map_err(|e| EngineError::load(source, e.to_string()))
}

/// Load a model folder or `.gguf` file onto `device`.
pub fn load(source: &Path, device: &Device) -> Result<Loaded, EngineError> {
    if is_gguf(source) {
        check_source(source)?;
        return super::gguf::load(source, device);
    }
    load_folder(source, device)
}

fn load_folder(dir: &Path, device: &Device) -> Result<Loaded, EngineError> {
    let (info, config) = read_folder_info(dir)?;
    // CPU kernels are fastest and most complete in f32; GPUs run bf16.
    let dtype = if device.is_cpu() { DType::F32 } else { DType::BF16 };
    let files = weight_files(dir)?;
    let (tensors, origin) = load_tensors(&files, dtype, device)?;
    for (name, shape) in info.dims.expected_tensors() {
        match tensors.get(&name) {
            None => {
                let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
                return Err(EngineError::load(
                    dir,
                    format!("missing tensor {name} (looked in {})", files.join(", ")),
                ));
            }
            Some(tensor) if tensor.dims() != shape.as_slice() => {
                let file = origin.get(&name).map_or_else(|| dir.to_path_buf(), Clone::clone);
                return Err(EngineError::load(
                    &file,
                    format!(
                        "tensor {name} has shape {:?}, config.json implies {shape:?}",
                        tensor.dims()
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    let model = models::build(info.arch, &config, vb, dtype, device)
        .map_err(|m| EngineError::load(&dir.join("config.json"), m))?;
    Ok(Loaded { model, info })
}
