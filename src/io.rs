//! One wrapper for every socket the gateway watches: the client connections (their watchdog and
//! request-line reader) and the upstream connections (their count). The I/O is delegated once, here;
//! what each side wants to know is a [`Sensor`] (linkerd2-proxy's `SensorIo` is the pattern).

use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Told about a socket's traffic. Both calls happen on every read or write, so keep them cheap.
pub trait Sensor {
    /// Bytes arrived (never empty).
    fn read(&mut self, _bytes: &[u8]) {}
    /// A write went through (`false`) or found the peer's window full (`true`).
    fn write(&mut self, _blocked: bool) {}
}

/// A socket with a [`Sensor`] attached. tokio's traits; wrap in `hyper_util::rt::TokioIo` for hyper.
pub struct SensorIo<T, S> {
    io: T,
    sensor: S,
}

impl<T, S> SensorIo<T, S> {
    pub fn new(io: T, sensor: S) -> SensorIo<T, S> {
        SensorIo { io, sensor }
    }

    pub fn sensor(&self) -> &S {
        &self.sensor
    }
}

impl<T: AsyncRead + Unpin, S: Sensor + Unpin> AsyncRead for SensorIo<T, S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.sensor.read(&buf.filled()[before..]);
        }
        res
    }
}

impl<T: AsyncWrite + Unpin, S: Sensor + Unpin> AsyncWrite for SensorIo<T, S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.sensor.write(r.is_pending());
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.sensor.write(r.is_pending());
        r
    }
}
