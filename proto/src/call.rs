//! Typed request/response pairs.
//!
//! Every request is a struct implementing [`Call`]; on the wire it travels wrapped in its
//! service's envelope enum, and the answer is a `Result<Call::Reply, RemoteError>`.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A request with a known reply type.
pub trait Call: Serialize + DeserializeOwned + std::fmt::Debug + Send + 'static {
    type Reply: Serialize + DeserializeOwned + std::fmt::Debug + Send + 'static;
    /// The enum all requests of this service travel in.
    type Envelope: Serialize + DeserializeOwned + std::fmt::Debug + Send + 'static;
    /// Short name for logs.
    const NAME: &'static str;
    fn into_envelope(self) -> Self::Envelope;
}

/// Declares a service's envelope enum and ties each request struct to its reply type.
macro_rules! service {
    ($(#[$meta:meta])* $envelope:ident { $($request:ident => $reply:ty),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(serde::Serialize, serde::Deserialize, Debug)]
        pub enum $envelope {
            $($request($request)),+
        }

        impl $envelope {
            /// The request's name, for logs.
            pub fn name(&self) -> &'static str {
                match self {
                    $($envelope::$request(_) => stringify!($request)),+
                }
            }
        }

        $(
            impl $crate::call::Call for $request {
                type Reply = $reply;
                type Envelope = $envelope;
                const NAME: &'static str = stringify!($request);
                fn into_envelope(self) -> $envelope {
                    $envelope::$request(self)
                }
            }
        )+
    };
}
pub(crate) use service;
