//! The toy backbones of the architect's unit tests: [`zhijian_backbones::toys`].

pub use zhijian_backbones::toys::*;
