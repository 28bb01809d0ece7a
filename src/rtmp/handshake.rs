//! The RTMP handshake, server and client side: simple and digest ("complex").
