//! RTMP messages: types, protocol control messages and user control events.
