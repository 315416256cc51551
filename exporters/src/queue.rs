//! The sending queue and retry. (Skeleton.)
