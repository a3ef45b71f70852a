//! Reading QEMU's `screendump` files: binary PPM (`P6`, width, height, 255, then RGB bytes),
//! the tests' independent view of a VM's screen.

/// A PPM picture: its size and its RGB bytes, row by row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ppm {
    /// Pixels per row.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// Three bytes a pixel.
    pub rgb: Vec<u8>,
}

/// Reads `data` as a binary PPM with 8-bit channels; panics (a test's failure) otherwise.
pub fn read(data: &[u8]) -> Ppm {
    let mut fields = Vec::new();
    let mut at = 0;
    while fields.len() < 4 {
        while data[at].is_ascii_whitespace() {
            at += 1;
        }
        let start = at;
        while !data[at].is_ascii_whitespace() {
            at += 1;
        }
        fields.push(String::from_utf8_lossy(&data[start..at]).into_owned());
    }
    assert_eq!((fields[0].as_str(), fields[3].as_str()), ("P6", "255"));
    let (width, height) = (fields[1].parse().unwrap(), fields[2].parse().unwrap());
    let rgb = data[at + 1..].to_vec();
    assert_eq!(rgb.len(), width * height * 3, "the pixels fill the picture");
    Ppm { width, height, rgb }
}
