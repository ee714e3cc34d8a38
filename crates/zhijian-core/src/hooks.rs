//! What the forward hooks of transformer backbones hand to methods: the token
//! sequence entering a block with its key mask and [`Layout`], an attention
//! layer's keys and values ([`Kv`]), and which sub-layer of a block a
//! [`SubLayer`] hook sits around.
//!
//! Backbones pool and mask through the layout, never through hard-coded
//! offsets, so a method that lengthens the sequence (VPT) keeps pooling right.

use tch::{Kind, Tensor};

/// Where a backbone's own tokens and the tokens methods inserted sit in a
/// sequence: `[lead | inserted | content]`.
///
/// `lead` tokens are the backbone's special tokens at the front (ViT's class
/// token); methods insert their tokens right after them; `content` is the rest
/// (patches, or BERT's word pieces from the first one after `[CLS]`). The
/// last `observers` inserted tokens only observe: no token attends to them,
/// so they read every layer without changing what the backbone computes (VQT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Layout {
    /// Backbone tokens before the insertion point (1 for a class token).
    pub lead: i64,
    /// Tokens methods inserted after `lead` (observers included).
    pub inserted: i64,
    /// How many of the inserted tokens, at the end of their range, are observers.
    pub observers: i64,
    /// The patch grid `[rows, cols]` of the content tokens, for ViTs.
    pub grid: Option<[i64; 2]>,
}

impl Layout {
    /// Index of the first content token.
    pub fn content_start(&self) -> i64 {
        self.lead + self.inserted
    }

    /// Index of the first observer token.
    pub fn observers_start(&self) -> i64 {
        self.content_start() - self.observers
    }

    /// The backbone's own tokens of `x` (lead and content), without the inserted ones.
    ///
    /// # Shapes
    /// `x`: `[batch, tokens, …]` → `[batch, tokens − inserted, …]`.
    pub fn own_tokens(&self, x: &Tensor) -> Tensor {
        if self.inserted == 0 {
            return x.shallow_clone();
        }
        let t = x.size()[1];
        let start = self.content_start();
        Tensor::cat(&[x.narrow(1, 0, self.lead), x.narrow(1, start, t - start)], 1)
    }
}

/// The token sequence entering a transformer block.
#[derive(Debug)]
pub struct Tokens {
    /// Token states `[batch, tokens, hidden]`.
    pub x: Tensor,
    /// `[batch, tokens]` bool, true where a token may be attended to; `None`
    /// means every token may.
    pub keep: Option<Tensor>,
    /// Where the backbone's and the methods' tokens are.
    pub layout: Layout,
}

impl Tokens {
    /// Inserts `new` (`[batch, k, hidden]`) right after the lead tokens, as
    /// attendable tokens, and records them in the layout.
    pub fn insert(self, new: &Tensor) -> Tokens {
        let (b, k) = (new.size()[0], new.size()[1]);
        let start = self.layout.lead;
        let t = self.x.size()[1];
        let x = Tensor::cat(&[self.x.narrow(1, 0, start), new.to_kind(self.x.kind()), self.x.narrow(1, start, t - start)], 1);
        let keep = self.keep.map(|keep| {
            let ones = Tensor::ones([b, k], (Kind::Bool, keep.device()));
            Tensor::cat(&[keep.narrow(1, 0, start), ones, keep.narrow(1, start, t - start)], 1)
        });
        Tokens { x, keep, layout: Layout { inserted: self.layout.inserted + k, ..self.layout } }
    }

    /// Inserts `new` (`[batch, k, hidden]`) as observers, at the end of the
    /// inserted range: they attend to the backbone's tokens, nothing attends to them.
    pub fn insert_observers(self, new: &Tensor) -> Tokens {
        let k = new.size()[1];
        let at = self.layout.content_start();
        let t = self.x.size()[1];
        let x = Tensor::cat(&[self.x.narrow(1, 0, at), new.to_kind(self.x.kind()), self.x.narrow(1, at, t - at)], 1);
        let keep = self.keep.map(|keep| {
            let ones = Tensor::ones([keep.size()[0], k], (Kind::Bool, keep.device()));
            Tensor::cat(&[keep.narrow(1, 0, at), ones, keep.narrow(1, at, t - at)], 1)
        });
        let layout = Layout { inserted: self.layout.inserted + k, observers: self.layout.observers + k, ..self.layout };
        Tokens { x, keep, layout }
    }

    /// Replaces the first `new.size()[1]` inserted tokens with `new` (VPT-deep:
    /// each block's own prompts take the place of the previous block's).
    pub fn replace_inserted(self, new: &Tensor) -> Tokens {
        let k = new.size()[1];
        assert!(k <= self.layout.inserted - self.layout.observers, "replacing {k} inserted tokens, but only {} were inserted", self.layout.inserted);
        let start = self.layout.lead;
        self.replace_at(start, new)
    }

    /// Replaces the first `new.size()[1]` observers with `new` (VQT: each
    /// block's own queries take the place of the previous block's).
    pub fn replace_observers(self, new: &Tensor) -> Tokens {
        let k = new.size()[1];
        assert!(k <= self.layout.observers, "replacing {k} observers, but only {} were inserted", self.layout.observers);
        let start = self.layout.observers_start();
        self.replace_at(start, new)
    }

    fn replace_at(self, start: i64, new: &Tensor) -> Tokens {
        let (k, t) = (new.size()[1], self.x.size()[1]);
        let x = Tensor::cat(&[self.x.narrow(1, 0, start), new.to_kind(self.x.kind()), self.x.narrow(1, start + k, t - start - k)], 1);
        Tokens { x, ..self }
    }

    /// The key mask as attention takes it: `[batch, 1, 1, tokens]`, false at
    /// padding and at observers (observers read, nobody reads them).
    pub fn attention_mask(&self) -> Option<Tensor> {
        let mask = |keep: &Tensor| keep.view([keep.size()[0], 1, 1, keep.size()[1]]);
        if self.layout.observers == 0 {
            return self.keep.as_ref().map(mask);
        }
        let (b, t) = (self.x.size()[0], self.x.size()[1]);
        let keep = self.keep.as_ref().map_or_else(|| Tensor::ones([b, t], (Kind::Bool, self.x.device())), Tensor::shallow_clone);
        let hidden = keep.zeros_like();
        let _ = hidden.narrow(1, self.layout.observers_start(), self.layout.observers).fill_(1);
        Some(mask(&keep.logical_and(&hidden.logical_not())))
    }
}

/// An attention layer's keys and values, before the heads are split.
#[derive(Debug)]
pub struct Kv {
    /// Keys `[batch, tokens, hidden]`.
    pub k: Tensor,
    /// Values `[batch, tokens, hidden]`.
    pub v: Tensor,
    /// `[batch, 1, 1, tokens]` bool, true where a key may be attended to.
    pub keep: Option<Tensor>,
}

impl Kv {
    /// Prepends `k`, `v` (`[batch, p, hidden]`) as keys every query may attend to.
    pub fn prepend(self, k: &Tensor, v: &Tensor) -> Kv {
        let p = k.size()[1];
        let keep = self.keep.map(|keep| {
            let s = keep.size();
            Tensor::cat(&[Tensor::ones([s[0], 1, 1, p], (Kind::Bool, keep.device())), keep], 3)
        });
        Kv { k: Tensor::cat(&[k.to_kind(self.k.kind()), self.k], 1), v: Tensor::cat(&[v.to_kind(self.v.kind()), self.v], 1), keep }
    }
}

/// The two sub-layers of a transformer block a method can wrap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubLayer {
    /// Multi-head self-attention, through its output projection.
    Attn,
    /// The feed-forward network (both projections).
    Mlp,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).view([1, values.len() as i64, 1])
    }

    #[test]
    fn insert_goes_after_the_lead_and_own_tokens_removes_it() {
        let t = Tokens {
            x: seq(&[0., 1., 2.]),
            keep: Some(Tensor::from_slice(&[true, true, false]).view([1, 3])),
            layout: Layout { lead: 1, ..Default::default() },
        };
        let t = t.insert(&seq(&[9., 8.]));
        assert_eq!(Vec::<f32>::try_from(t.x.flatten(0, -1)).unwrap(), [0., 9., 8., 1., 2.]);
        assert_eq!(Vec::<bool>::try_from(t.keep.as_ref().unwrap().flatten(0, -1)).unwrap(), [true, true, true, true, false]);
        assert_eq!(t.layout.content_start(), 3);
        assert_eq!(Vec::<f32>::try_from(t.layout.own_tokens(&t.x).flatten(0, -1)).unwrap(), [0., 1., 2.]);
        let t = t.replace_inserted(&seq(&[7.]));
        assert_eq!(Vec::<f32>::try_from(t.x.flatten(0, -1)).unwrap(), [0., 7., 8., 1., 2.]);
        assert_eq!(t.attention_mask().unwrap().size(), [1, 1, 1, 5]);
    }

    #[test]
    fn observers_sit_after_the_inserted_tokens_and_are_hidden_from_attention() {
        let t = Tokens { x: seq(&[0., 1., 2.]), keep: None, layout: Layout { lead: 1, ..Default::default() } };
        let t = t.insert(&seq(&[9.])).insert_observers(&seq(&[5., 6.]));
        assert_eq!(Vec::<f32>::try_from(t.x.flatten(0, -1)).unwrap(), [0., 9., 5., 6., 1., 2.]);
        assert_eq!((t.layout.observers_start(), t.layout.content_start()), (2, 4));
        let mask = t.attention_mask().unwrap();
        assert_eq!(Vec::<bool>::try_from(mask.flatten(0, -1)).unwrap(), [true, true, false, false, true, true]);
        let t = t.replace_observers(&seq(&[7.])).replace_inserted(&seq(&[8.]));
        assert_eq!(Vec::<f32>::try_from(t.x.flatten(0, -1)).unwrap(), [0., 8., 7., 6., 1., 2.]);
    }

    #[test]
    fn prepended_keys_are_attendable() {
        let kv = Kv { k: seq(&[1., 2.]), v: seq(&[3., 4.]), keep: Some(Tensor::from_slice(&[true, false]).view([1, 1, 1, 2])) };
        let kv = kv.prepend(&seq(&[5.]), &seq(&[6.]));
        assert_eq!(Vec::<f32>::try_from(kv.k.flatten(0, -1)).unwrap(), [5., 1., 2.]);
        assert_eq!(Vec::<f32>::try_from(kv.v.flatten(0, -1)).unwrap(), [6., 3., 4.]);
        assert_eq!(Vec::<bool>::try_from(kv.keep.unwrap().flatten(0, -1)).unwrap(), [true, true, false]);
    }
}
