//! Pre-trained backbones with upstream key names and hook sites.
