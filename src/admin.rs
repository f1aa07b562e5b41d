//! Admin listener. (Being written.)
