//! Text for the PNG plots, rasterised here rather than by plotters.
//!
//! plotters 0.3.7's ab_glyph renderer draws each glyph's outline at the pen
//! position, truncated to a whole pixel, ignoring the glyph's left side
//! bearing: narrow letters drift left and words read "full-finetun e",
//! "gaussi an". [`GlyphText`] wraps a backend and draws text itself, with
//! the glyphs of DejaVu Sans (the one font the plots use) placed at the pen
//! position plus their bearing, at sub-pixel precision, kerned. Layout,
//! anchors and rotation stay plotters' own, so labels land where they did.
//! SVG text is rendered by the viewer and needs none of this.

use ab_glyph::{Font, FontRef, ScaleFont, point};
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingBackend, DrawingErrorKind};

/// A backend whose text is drawn glyph by glyph in DejaVu Sans; everything
/// else goes to the wrapped backend.
pub struct GlyphText<B> {
    inner: B,
    font: FontRef<'static>,
}

impl<B> GlyphText<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> GlyphText<B> {
        let font = FontRef::try_from_slice(dejavu::sans::regular()).unwrap_or_else(|_| unreachable!("DejaVu Sans, compiled in, parses"));
        GlyphText { inner, font }
    }

    /// Calls `pixel(x, y, coverage)` for every pixel of `text` at `size`
    /// pixels, relative to the top left of its layout box (the baseline half
    /// a size down, as plotters places it).
    fn rasterise(&self, text: &str, size: f32, mut pixel: impl FnMut(i32, i32, f32)) {
        let font = self.font.as_scaled(size);
        let mut pen = 0.0f32;
        let mut prev = None;
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(p) = prev {
                pen += font.kern(p, id);
            }
            prev = Some(id);
            let glyph = id.with_scale_and_position(size, point(pen, 0.0));
            if let Some(outline) = font.outline_glyph(glyph) {
                let at = outline.px_bounds().min;
                let (x0, y0) = (at.x as i32, (size / 2.0 + at.y) as i32);
                outline.draw(|x, y, coverage| pixel(x0 + x as i32, y0 + y as i32, coverage));
            }
            pen += font.h_advance(id);
        }
    }
}

impl<B: DrawingBackend> DrawingBackend for GlyphText<B> {
    type ErrorType = B::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }

    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.present()
    }

    fn draw_pixel(&mut self, point: BackendCoord, color: BackendColor) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_pixel(point, color)
    }

    fn draw_line<S: BackendStyle>(&mut self, from: BackendCoord, to: BackendCoord, style: &S) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_line(from, to, style)
    }

    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(&mut self, path: I, style: &S) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_path(path, style)
    }

    fn draw_circle<S: BackendStyle>(&mut self, center: BackendCoord, radius: u32, style: &S, fill: bool) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(&mut self, vert: I, style: &S) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.fill_polygon(vert, style)
    }

    fn blit_bitmap(&mut self, pos: BackendCoord, size: (u32, u32), src: &[u8]) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.blit_bitmap(pos, size, src)
    }

    /// plotters' own placement (its layout box, anchor and rotation) with
    /// the glyphs of [`GlyphText::rasterise`].
    fn draw_text<S: BackendTextStyle>(&mut self, text: &str, style: &S, pos: BackendCoord) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let ((min_x, min_y), (max_x, max_y)) = style.layout_box(text).map_err(|e| DrawingErrorKind::FontError(Box::new(e)))?;
        let (width, height) = (max_x - min_x, max_y - min_y);
        let dx = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Right => -width,
            HPos::Center => -width / 2,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        };
        let transform = style.transform();
        let (w, h) = self.inner.get_size();
        let mut pixels = Vec::new();
        self.rasterise(text, style.size() as f32, |x, y, coverage| {
            let (x, y) = transform.transform(x + dx - min_x, y + dy - min_y);
            let (x, y) = (pos.0 + x, pos.1 + y);
            if (0..w as i32).contains(&x) && (0..h as i32).contains(&y) {
                pixels.push(((x, y), coverage));
            }
        });
        pixels.into_iter().try_for_each(|(p, coverage)| self.inner.draw_pixel(p, color.mix(coverage as f64)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Columns of `text` holding ink, as runs of consecutive x.
    fn ink_columns(text: &str) -> Vec<std::ops::Range<i32>> {
        let g = GlyphText::new(());
        let mut xs = std::collections::BTreeSet::new();
        g.rasterise(text, 40.0, |x, _, c| {
            if c > 0.3 {
                xs.insert(x);
            }
        });
        let mut runs: Vec<std::ops::Range<i32>> = Vec::new();
        for x in xs {
            match runs.last_mut() {
                Some(r) if r.end == x => r.end += 1,
                _ => runs.push(x..x + 1),
            }
        }
        runs
    }

    /// Every glyph's ink starts at its pen position plus its left side
    /// bearing (plotters' renderer starts it at the pen, so `i`, with a wide
    /// bearing, sits against the `n` before it and leaves a gap after).
    #[test]
    fn glyphs_start_at_pen_plus_bearing() {
        let text = "nine";
        let runs = ink_columns(text);
        assert_eq!(runs.len(), 4, "one run of ink per letter: {runs:?}");
        let font = FontRef::try_from_slice(dejavu::sans::regular()).unwrap();
        let font = font.as_scaled(40.0);
        let mut pen = 0.0f32;
        let mut prev = None;
        for (c, run) in text.chars().zip(&runs) {
            let id = font.glyph_id(c);
            pen += prev.map_or(0.0, |p| font.kern(p, id));
            let start = pen + font.h_side_bearing(id);
            assert!((run.start as f32 - start).abs() <= 1.0, "`{c}` inks from x = {}, its pen + bearing is {start:.1}: {runs:?}", run.start);
            pen += font.h_advance(id);
            prev = Some(id);
        }
    }
}
