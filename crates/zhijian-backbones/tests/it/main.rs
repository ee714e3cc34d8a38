//! Integration tests of the backbones (one binary: each links LibTorch).

mod bert;
mod resnet;
mod vit;
