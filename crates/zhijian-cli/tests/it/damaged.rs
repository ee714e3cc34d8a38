//! Damaged inputs, as a user meets them through `zhijian`: truncated, foreign
//! and mis-shaped safetensors, a truncated `.pth`, an image that does not
//! decode. Each ends the command with an error naming the file and what is
//! wrong, and no records file is written.

use std::path::{Path, PathBuf};

use crate::runs::image_folder;
use crate::{stderr, zhijian};

/// A safetensors file written byte by byte: `tensors` are (name, shape) of
/// F32 zeros; `cut` bytes are dropped from the end.
fn safetensors(path: &Path, tensors: &[(&str, &[i64])], cut: usize) {
    let mut header = header_json(tensors);
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let data_len: i64 = tensors.iter().map(|(_, s)| 4 * s.iter().product::<i64>()).sum();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, data_len as usize));
    bytes.truncate(bytes.len() - cut);
    std::fs::write(path, bytes).unwrap();
}

/// The safetensors header of `tensors`, laid out one after another.
fn header_json(tensors: &[(&str, &[i64])]) -> String {
    let mut offset = 0;
    let entries: Vec<String> = tensors
        .iter()
        .map(|(name, shape)| {
            let len = 4 * shape.iter().product::<i64>();
            let shape: Vec<String> = shape.iter().map(i64::to_string).collect();
            let entry = format!("\"{name}\":{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{offset},{}]}}", shape.join(","), offset + len);
            offset += len;
            entry
        })
        .collect();
    format!("{{{}}}", entries.join(","))
}

/// An experiment of the 32 px ViT-Tiny on the generated image folder, its
/// weights from `w.safetensors` beside it.
fn vit_experiment(dir: &Path) -> PathBuf {
    image_folder(dir);
    let text = "name = \"damaged\"\ndevice = \"cpu\"\n\
                [backbone]\nkind = \"vit\"\npreset = \"tiny_patch4_32\"\nweights = \"w.safetensors\"\n\
                [data]\nkind = \"image_folder\"\npath = \"imgs\"\nholdout = [0.25, 0.25]\n\
                [train]\nmax_steps = 2\nbatch_size = 8\n\
                [[strategy]]\nname = \"probe\"\nmethods = [{ method = \"linear_probe\" }]\n";
    let path = dir.join("exp.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `compare` on `config` and returns its stderr, checking it failed and
/// recorded nothing.
fn compare_fails(config: &Path) -> String {
    let records = config.with_file_name("records.jsonl");
    let out = zhijian(&["compare", config.to_str().unwrap(), "--records", records.to_str().unwrap(), "--no-feature-cache"]);
    assert!(!out.status.success(), "a damaged input must fail the command: {}", stderr(&out));
    assert!(!records.exists(), "nothing is recorded from a damaged input");
    stderr(&out)
}

#[test]
fn damaged_weights_are_named_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let config = vit_experiment(dir.path());
    let weights = dir.path().join("w.safetensors");
    let contains_all = |err: &str, words: &[&str]| {
        for w in words {
            assert!(err.contains(w), "`{w}` not in: {err}");
        }
    };

    std::fs::write(&weights, b"these are not tensors").unwrap();
    contains_all(&compare_fails(&config), &["w.safetensors", "cannot read"]);

    // A header promising 768 bytes of class token, with 100 of them cut off.
    safetensors(&weights, &[("cls_token", &[1, 1, 192])], 100);
    contains_all(&compare_fails(&config), &["w.safetensors", "cannot read"]);

    // Readable, but for another width: every mis-shaped tensor is listed.
    safetensors(&weights, &[("cls_token", &[1, 1, 7]), ("pos_embed", &[1, 5, 7])], 0);
    contains_all(
        &compare_fails(&config),
        &["w.safetensors", "2 tensor(s) have the wrong shape", "`cls_token` (model [1, 1, 192], file [1, 1, 7])", "`pos_embed`"],
    );

    // Readable, of the right kind, but incomplete: the missing keys are listed.
    safetensors(&weights, &[("cls_token", &[1, 1, 192])], 0);
    contains_all(&compare_fails(&config), &["weights missing from", "w.safetensors", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"]);

    // No file at all.
    std::fs::remove_file(&weights).unwrap();
    contains_all(&compare_fails(&config), &["w.safetensors", "neither a file"]);
}

#[test]
fn an_image_that_does_not_decode_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = vit_experiment(dir.path());
    std::fs::write(dir.path().join("imgs/bright_top/zz-broken.png"), b"\x89PNG\r\n\x1a\n but then nothing of an image").unwrap();
    // Random init: the image is met whatever the weights.
    let text = std::fs::read_to_string(&config).unwrap().replace("weights = \"w.safetensors\"\n", "");
    std::fs::write(&config, text).unwrap();
    let err = compare_fails(&config);
    assert!(err.contains("zz-broken.png"), "{err}");
}

#[test]
fn a_truncated_pth_is_named_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(crate::pth_fixture("tiny_zip.pth")).unwrap();
    for (name, cut) in [("half.pth", bytes.len() / 2), ("header.pth", 40)] {
        let input = dir.path().join(name);
        std::fs::write(&input, &bytes[..cut]).unwrap();
        let output = dir.path().join(format!("{name}.safetensors"));
        let out = zhijian(&["convert", input.to_str().unwrap(), output.to_str().unwrap()]);
        assert!(!out.status.success() && stderr(&out).contains(name), "{}", stderr(&out));
        assert!(!output.exists(), "no output from a damaged checkpoint");
    }
}
