//! The protobuf codec of every generated service and client: `tonic_prost::ProstCodec`, except that
//! bytes that do not decode as the expected message are `INVALID_ARGUMENT` (the peer sent a
//! malformed message), not `INTERNAL` (which would claim the receiver is broken). `build.rs` points
//! the generated code here.

use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// [`tonic_prost::ProstCodec`] with decode errors as `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct QrCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for QrCodec<T, U> {
    fn default() -> Self {
        QrCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for QrCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = QrDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        QrDecoder(ProstDecoder::new(BufferSettings::default()))
    }
}

/// Decodes like [`ProstDecoder`]; a message that does not decode is `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct QrDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for QrDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| {
            Status::invalid_argument(format!("malformed protobuf message: {}", s.message()))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
