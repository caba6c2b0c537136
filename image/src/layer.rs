//! Layer blobs: which media types bulkhead unpacks, and their decompression.

use std::io::{self, BufRead, BufReader, Read};

/// How a layer's tar stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    /// A plain tar.
    None,
    /// gzip (possibly several members, as pigz writes).
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// The compression of layer media type `media_type`, or why it is refused.
    pub(crate) fn from_media_type(media_type: &str) -> Result<Compression, &'static str> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Ok(Compression::Zstd),
            t if t.contains("nondistributable") || t.contains("foreign") => Err(
                "foreign (non-distributable) layers are not supported: their content is not \
                 in the registry but at URLs of the image's vendor (usually Windows base \
                 layers, which cannot run here anyway)",
            ),
            t if t.contains("encrypted") => Err("encrypted layers are not supported"),
            _ => Err(
                "bulkhead unpacks only tar, tar+gzip and tar+zstd layers; this is \
                      not a container image layer it knows",
            ),
        }
    }

    /// The compression of a stream starting with `magic` (sniffed, for archives
    /// whose layers carry no media type).
    pub(crate) fn sniff(magic: &[u8]) -> Compression {
        if magic.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The word for messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Compression::None => "plain",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    /// The OCI layer media type of this compression.
    pub(crate) fn oci_media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    /// `reader`, decompressed.
    pub(crate) fn decoder<'a, R: Read + 'a>(self, reader: R) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::None => Box::new(reader),
            Compression::Gzip => {
                Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(reader)))
            }
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(reader)?),
        })
    }
}

/// The compression of what `reader` holds, judged from its first bytes, which
/// stay readable.
pub(crate) fn sniff_reader<R: Read>(reader: R) -> io::Result<(Compression, BufReader<R>)> {
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let compression = Compression::sniff(reader.fill_buf()?);
    Ok((compression, reader))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn decoders_round_trip() {
        let data = b"some tar bytes".repeat(100);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::stream::encode_all(&data[..], 1).unwrap();
        for (bytes, expected) in [
            (&data[..], Compression::None),
            (&gz[..], Compression::Gzip),
            (&zst[..], Compression::Zstd),
        ] {
            let (found, reader) = sniff_reader(bytes).unwrap();
            assert_eq!(found, expected);
            let mut out = Vec::new();
            found
                .decoder(reader)
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
            assert_eq!(out, data);
        }
    }
}
