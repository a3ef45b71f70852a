//! Screenshots through the VM's VNC socket: one full, non-incremental framebuffer update,
//! assembled until every pixel has arrived, as a [`Screen`] of RGBA pixels (and PNG bytes
//! for artifacts).

use std::time::Duration;

use thiserror::Error;
use tokio::net::UnixStream;

use crate::sandbox::runtime::VncEndpoint;
use vnc::{PixelFormat, Rect, VncConnector, VncEncoding, VncError, VncEvent};

/// Why a screenshot could not be taken.
#[derive(Debug, Error)]
pub enum ScreenshotError {
    /// The VNC socket could not be reached.
    #[error("connecting to VNC socket {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The RFB conversation failed.
    #[error("VNC: {0}")]
    Protocol(String),
    /// The server sent a rectangle outside the framebuffer or of the wrong size.
    #[error("VNC sent a malformed update: {0}")]
    Malformed(String),
    /// The whole framebuffer did not arrive in time.
    #[error("VNC framebuffer incomplete after {0:?}")]
    Timeout(Duration),
    /// PNG encoding failed.
    #[error("encoding PNG: {0}")]
    Encode(#[from] png::EncodingError),
    /// PNG decoding failed (or the picture is not 8-bit RGB or RGBA).
    #[error("decoding PNG: {0}")]
    Decode(String),
}

/// A captured screen: `width` × `height` RGBA pixels, row by row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Screen {
    width: u32,
    height: u32,
    rgba: Vec<u8>,
}

impl Screen {
    /// The screen of these pixels; `None` when `rgba` is not `width × height × 4` bytes.
    pub fn new(width: u32, height: u32, rgba: Vec<u8>) -> Option<Screen> {
        let expected = (width as usize)
            .checked_mul(height as usize)?
            .checked_mul(BYTES_PER_PIXEL)?;
        (rgba.len() == expected).then_some(Screen {
            width,
            height,
            rgba,
        })
    }

    /// `(width, height)`.
    pub fn dimensions(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    /// The RGBA bytes, row by row.
    pub fn rgba(&self) -> &[u8] {
        &self.rgba
    }

    /// The pixel at `(x, y)` as `[r, g, b, a]`, or `None` outside the screen.
    pub fn pixel(&self, x: u32, y: u32) -> Option<[u8; 4]> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let start = (y as usize * self.width as usize + x as usize) * BYTES_PER_PIXEL;
        self.rgba[start..start + BYTES_PER_PIXEL].try_into().ok()
    }

    /// Decodes 8-bit RGB or RGBA PNG bytes, at most 64 MiB of pixels (the `png` crate's
    /// default limit).
    pub fn decode_png(bytes: &[u8]) -> Result<Screen, ScreenshotError> {
        let failed = |error: &dyn std::fmt::Display| ScreenshotError::Decode(error.to_string());
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .map_err(|e| failed(&e))?;
        let size = reader
            .output_buffer_size()
            .ok_or_else(|| failed(&"the picture is too large"))?;
        let mut buffer = vec![0; size];
        let info = reader.next_frame(&mut buffer).map_err(|e| failed(&e))?;
        buffer.truncate(info.buffer_size());
        let rgba = match (info.color_type, info.bit_depth) {
            (png::ColorType::Rgba, png::BitDepth::Eight) => buffer,
            (png::ColorType::Rgb, png::BitDepth::Eight) => buffer
                .chunks_exact(3)
                .flat_map(|rgb| [rgb[0], rgb[1], rgb[2], 0xff])
                .collect(),
            (color, depth) => return Err(failed(&format!("{color:?} at {depth:?}"))),
        };
        Screen::new(info.width, info.height, rgba)
            .ok_or_else(|| failed(&"the pixels do not fill the picture"))
    }
}

impl From<VncError> for ScreenshotError {
    fn from(error: VncError) -> Self {
        ScreenshotError::Protocol(error.to_string())
    }
}

/// Bytes per pixel in the format we ask the server for (32-bit RGBA).
const BYTES_PER_PIXEL: usize = 4;

/// Captures the whole screen from a VM's VNC server.
pub async fn capture(vnc: &VncEndpoint, timeout: Duration) -> Result<Screen, ScreenshotError> {
    let stream = vnc.connect().map_err(|source| ScreenshotError::Connect {
        path: vnc.path().display().to_string(),
        source,
    })?;
    match tokio::time::timeout(timeout, capture_from(stream)).await {
        Ok(result) => result,
        Err(_) => Err(ScreenshotError::Timeout(timeout)),
    }
}

async fn capture_from(stream: UnixStream) -> Result<Screen, ScreenshotError> {
    // The socket lives in the VM's private 0700 directory: QEMU offers no password, so the
    // password callback is never polled.
    let client = VncConnector::new(stream)
        .set_auth_method(std::future::ready(Err(VncError::NoPassword)))
        .add_encoding(VncEncoding::Raw)
        .add_encoding(VncEncoding::CopyRect)
        .allow_shared(true)
        .set_pixel_format(PixelFormat::rgba())
        .build()?
        .try_start()
        .await?
        .finish()?;
    // The client asks for a full non-incremental update as soon as it connects.
    let mut frame: Option<Frame> = None;
    let result = loop {
        let event = match client.recv_event().await {
            Ok(event) => event,
            Err(error) => break Err(error.into()),
        };
        match event {
            VncEvent::SetResolution(screen) => {
                frame = Some(Frame::new(screen.width, screen.height));
            }
            VncEvent::RawImage(rect, data) => {
                let frame = frame.as_mut().ok_or_else(|| no_resolution("an image"))?;
                frame.paint(rect, &data)?;
            }
            VncEvent::Copy(destination, source) => {
                let frame = frame.as_mut().ok_or_else(|| no_resolution("a copy"))?;
                frame.copy(destination, source)?;
            }
            VncEvent::JpegImage(..) => {
                break Err(ScreenshotError::Malformed(
                    "a JPEG rectangle although only Raw and CopyRect were offered".into(),
                ))
            }
            VncEvent::Error(message) => break Err(ScreenshotError::Protocol(message)),
            _ => {}
        }
        if let Some(done) = frame.as_ref().filter(|frame| frame.is_complete()) {
            break Ok(done.to_screen());
        }
    };
    let _ = client.close().await;
    result
}

fn no_resolution(what: &str) -> ScreenshotError {
    ScreenshotError::Malformed(format!("{what} before the screen size"))
}

/// Encodes `screen` as PNG.
pub fn encode_png(screen: &Screen) -> Result<Vec<u8>, ScreenshotError> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, screen.width, screen.height);
    encoder.set_color(png::ColorType::Rgba);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&screen.rgba)?;
    writer.finish()?;
    Ok(bytes)
}

/// A framebuffer being assembled, with a record of which pixels have arrived.
struct Frame {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
    painted: Vec<bool>,
    missing: usize,
}

impl Frame {
    fn new(width: u16, height: u16) -> Self {
        let (width, height) = (usize::from(width), usize::from(height));
        Frame {
            width,
            height,
            pixels: vec![0; width * height * BYTES_PER_PIXEL],
            painted: vec![false; width * height],
            missing: width * height,
        }
    }

    fn is_complete(&self) -> bool {
        self.missing == 0
    }

    fn check(&self, rect: Rect) -> Result<(usize, usize, usize, usize), ScreenshotError> {
        let (x, y) = (usize::from(rect.x), usize::from(rect.y));
        let (w, h) = (usize::from(rect.width), usize::from(rect.height));
        if x + w > self.width || y + h > self.height {
            return Err(ScreenshotError::Malformed(format!(
                "rectangle {w}x{h}+{x}+{y} outside the {}x{} screen",
                self.width, self.height
            )));
        }
        Ok((x, y, w, h))
    }

    fn mark(&mut self, x: usize, y: usize, w: usize, h: usize) {
        for row in y..y + h {
            for flag in &mut self.painted[row * self.width + x..row * self.width + x + w] {
                if !*flag {
                    *flag = true;
                    self.missing -= 1;
                }
            }
        }
    }

    fn paint(&mut self, rect: Rect, data: &[u8]) -> Result<(), ScreenshotError> {
        let (x, y, w, h) = self.check(rect)?;
        let row_bytes = w * BYTES_PER_PIXEL;
        if data.len() != row_bytes * h {
            return Err(ScreenshotError::Malformed(format!(
                "{} bytes for a {w}x{h} rectangle",
                data.len()
            )));
        }
        for (row, source) in data.chunks_exact(row_bytes.max(1)).enumerate() {
            let start = ((y + row) * self.width + x) * BYTES_PER_PIXEL;
            self.pixels[start..start + row_bytes].copy_from_slice(source);
        }
        self.mark(x, y, w, h);
        Ok(())
    }

    fn copy(&mut self, destination: Rect, source: Rect) -> Result<(), ScreenshotError> {
        let (dx, dy, w, h) = self.check(destination)?;
        let (sx, sy, _, _) = self.check(Rect {
            width: destination.width,
            height: destination.height,
            ..source
        })?;
        let row_bytes = w * BYTES_PER_PIXEL;
        let rows: Vec<Vec<u8>> = (0..h)
            .map(|row| {
                let start = ((sy + row) * self.width + sx) * BYTES_PER_PIXEL;
                self.pixels[start..start + row_bytes].to_vec()
            })
            .collect();
        for (row, bytes) in rows.iter().enumerate() {
            let start = ((dy + row) * self.width + dx) * BYTES_PER_PIXEL;
            self.pixels[start..start + row_bytes].copy_from_slice(bytes);
        }
        self.mark(dx, dy, w, h);
        Ok(())
    }

    fn to_screen(&self) -> Screen {
        let mut rgba = self.pixels.clone();
        // The RGBA pixel format's fourth byte is padding, not alpha.
        for pixel in rgba.chunks_exact_mut(BYTES_PER_PIXEL) {
            pixel[3] = 0xff;
        }
        Screen {
            width: self.width as u32,
            height: self.height as u32,
            rgba,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rect(x: u16, y: u16, width: u16, height: u16) -> Rect {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    #[test]
    fn a_frame_is_complete_only_when_every_pixel_arrived() {
        let mut frame = Frame::new(4, 2);
        frame.paint(rect(0, 0, 4, 1), &[1; 16]).unwrap();
        assert!(!frame.is_complete());
        frame.paint(rect(0, 0, 4, 1), &[2; 16]).unwrap();
        assert!(!frame.is_complete(), "repainting a row adds nothing");
        frame.copy(rect(0, 1, 4, 1), rect(0, 0, 4, 1)).unwrap();
        assert!(frame.is_complete());
        let image = frame.to_screen();
        assert_eq!(image.pixel(3, 1), Some([2, 2, 2, 0xff]));
    }

    #[test]
    fn rectangles_outside_the_screen_or_of_the_wrong_size_are_refused() {
        let mut frame = Frame::new(4, 2);
        assert!(matches!(
            frame.paint(rect(3, 0, 2, 1), &[0; 8]),
            Err(ScreenshotError::Malformed(_))
        ));
        assert!(matches!(
            frame.paint(rect(0, 0, 2, 1), &[0; 7]),
            Err(ScreenshotError::Malformed(_))
        ));
        assert!(matches!(
            frame.copy(rect(0, 0, 2, 2), rect(3, 0, 1, 1)),
            Err(ScreenshotError::Malformed(_))
        ));
    }
}
