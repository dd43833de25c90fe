//! The local engine on GGUF files generated here (`make-tiny --gguf`): served through the
//! API like a folder model, and every broken file refused with the file and the cause named.

use crate::common;

use std::path::{Path, PathBuf};

use candle_core::{
    Device, Tensor,
    quantized::{GgmlDType, QTensor, gguf_file::Value as GgufValue},
};
use common::spawn_local_app;
use lifeboat::engine::{
    Arch, LocalBackend, LocalSettings,
    testing::tiny_gguf::{GgufParts, make_tiny_gguf, tiny_gguf_parts, write_gguf},
};
use serde_json::{Value, json};

fn tiny_gguf(dir: &Path, arch: Arch) -> PathBuf {
    let file = dir.join(format!("tiny-{}.gguf", arch.short_name()));
    make_tiny_gguf(arch, &file, 7).expect("tiny GGUF");
    file
}

/// The load error of `file`, as `/ready` and the logs report it.
async fn load_error(file: &Path) -> String {
    let backend = LocalBackend::start(&LocalSettings {
        queue_capacity: 1,
        ..LocalSettings::new(file)
    });
    match backend {
        Err(err) => err.to_string(),
        Ok(backend) => backend.wait_ready().await.expect_err("the model must not load"),
    }
}

fn broken(dir: &Path, name: &str, edit: impl FnOnce(&mut GgufParts)) -> PathBuf {
    let mut parts = tiny_gguf_parts(Arch::Qwen2, 7).expect("parts");
    edit(&mut parts);
    let file = dir.join(name);
    write_gguf(&file, &parts).expect("write");
    file
}

#[tokio::test]
async fn a_gguf_file_is_served_through_the_api() {
    let dir = tempfile::tempdir().expect("temp dir");
    for arch in [Arch::Qwen2, Arch::Llama, Arch::Qwen3] {
        let app = spawn_local_app(&tiny_gguf(dir.path(), arch), "tiny-gguf").await;
        let body = json!({
            "model": "tiny-gguf",
            "messages": [{"role": "user", "content": "Hello there"}],
            "max_tokens": 8,
            "temperature": 0,
        });
        let first: Value = app
            .post_json("/v1/chat/completions", &body)
            .await
            .json()
            .await
            .expect("json");
        let second: Value = app
            .post_json("/v1/chat/completions", &body)
            .await
            .json()
            .await
            .expect("json");
        assert_eq!(
            first["choices"][0]["message"], second["choices"][0]["message"],
            "greedy is deterministic"
        );
        assert_eq!(first["usage"]["completion_tokens"], 8, "{first}");
        assert_eq!(first["choices"][0]["finish_reason"], "length");
        let response = app
            .post_json(
                "/v1/completions",
                &json!({"model": "tiny-gguf", "prompt": "The server", "max_tokens": 4}),
            )
            .await;
        assert_eq!(response.status(), 200);
        let models: Value = app.get("/v1/models").await.json().await.expect("json");
        assert_eq!(models["data"][0]["id"], "tiny-gguf");
    }
}

#[tokio::test]
async fn broken_gguf_files_are_refused_with_the_cause() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = tiny_gguf(dir.path(), Arch::Qwen2);

    // A download cut short.
    let bytes = std::fs::read(&good).expect("read");
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).expect("write");
    let err = load_error(&truncated).await;
    assert!(
        err.contains("truncated.gguf") && err.contains("truncated file: tensor"),
        "{err}"
    );

    // Not a GGUF at all, and a header cut in the middle.
    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a model").expect("write");
    let err = load_error(&garbage).await;
    assert!(
        err.contains("garbage.gguf") && err.contains("not a readable GGUF file"),
        "{err}"
    );
    let header_cut = dir.path().join("header-cut.gguf");
    std::fs::write(&header_cut, &bytes[..2000]).expect("write");
    let err = load_error(&header_cut).await;
    assert!(err.contains("not a readable GGUF file"), "{err}");

    let file = broken(dir.path(), "mamba.gguf", |p| {
        p.set("general.architecture", GgufValue::String("mamba".into()));
    });
    let err = load_error(&file).await;
    assert!(
        err.contains("unsupported GGUF architecture `mamba`") && err.contains("qwen2"),
        "{err}"
    );

    let file = broken(dir.path(), "pre.gguf", |p| {
        p.set("tokenizer.ggml.pre", GgufValue::String("gpt-4o".into()));
    });
    let err = load_error(&file).await;
    assert!(
        err.contains("tokenizer.ggml.pre `gpt-4o` is not implemented"),
        "{err}"
    );

    let file = broken(dir.path(), "missing.gguf", |p| {
        p.tensors.retain(|(name, _)| name != "blk.1.ffn_up.weight");
    });
    let err = load_error(&file).await;
    assert!(
        err.contains("missing.gguf") && err.contains("missing tensor blk.1.ffn_up.weight"),
        "{err}"
    );

    let file = broken(dir.path(), "shape.gguf", |p| {
        let wrong = Tensor::zeros((3, 64), candle_core::DType::F32, &Device::Cpu).expect("tensor");
        let wrong = QTensor::quantize(&wrong, GgmlDType::F32).expect("qtensor");
        for (name, tensor) in &mut p.tensors {
            if name == "blk.0.attn_k.weight" {
                *tensor = wrong;
                break;
            }
        }
    });
    let err = load_error(&file).await;
    assert!(
        err.contains("tensor blk.0.attn_k.weight has shape [3, 64]"),
        "{err}"
    );

    let file = broken(dir.path(), "key.gguf", |p| {
        p.metadata.retain(|(k, _)| k != "qwen2.block_count");
    });
    let err = load_error(&file).await;
    assert!(err.contains("metadata key qwen2.block_count is missing"), "{err}");

    let file = broken(dir.path(), "yarn.gguf", |p| {
        p.set("qwen2.rope.scaling.type", GgufValue::String("yarn".into()));
    });
    let err = load_error(&file).await;
    assert!(
        err.contains("rope.scaling.type `yarn` is not implemented"),
        "{err}"
    );

    let err = load_error(&dir.path().join("absent.gguf")).await;
    assert!(
        err.contains("absent.gguf") && err.contains("cannot open"),
        "{err}"
    );
}
