//! Tells RTMP, RTMPE, TLS and HTTP apart from the first bytes of a connection.
