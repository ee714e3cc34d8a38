//! zhijian: reuse pre-trained models.
