//! Built-in training videos: one coloured shape (a square or a disc) moving in a straight
//! line and bouncing off the frame's edges, on a black background, in pixel space
//! (`C` channels with values in [-1, 1], channel `c` showing the colour's `c mod 3`
//! component).
//!
//! Each clip comes with a caption embedding that encodes its colour, shape and initial
//! direction: a fixed random vector per colour, per direction and per shape (drawn from
//! a built-in vocabulary seed, so the same caption means the same thing whatever the
//! run's seed), placed round-robin in the caption's tokens and summed where they share
//! one; remaining tokens are zero. Clip `i` of seed `s` is a pure function of `(s, i)`.

use super::{Clip, ClipShape, DataError, Dataset};
use crate::random::{normal_values, rng_for};
use rand::Rng;

/// Seed of the caption vocabulary (independent of the run's seed).
const VOCABULARY_SEED: u64 = 0x1a77e;

/// Colours and their RGB values in [-1, 1].
pub const COLOURS: [(&str, [f32; 3]); 6] = [
    ("red", [1.0, -1.0, -1.0]),
    ("green", [-1.0, 1.0, -1.0]),
    ("blue", [-1.0, -1.0, 1.0]),
    ("yellow", [1.0, 1.0, -1.0]),
    ("cyan", [-1.0, 1.0, 1.0]),
    ("magenta", [1.0, -1.0, 1.0]),
];

/// Directions of motion: name and unit step (x right, y down).
pub const DIRECTIONS: [(&str, [f32; 2]); 8] = [
    ("east", [1.0, 0.0]),
    (
        "north-east",
        [
            std::f32::consts::FRAC_1_SQRT_2,
            -std::f32::consts::FRAC_1_SQRT_2,
        ],
    ),
    ("north", [0.0, -1.0]),
    (
        "north-west",
        [
            -std::f32::consts::FRAC_1_SQRT_2,
            -std::f32::consts::FRAC_1_SQRT_2,
        ],
    ),
    ("west", [-1.0, 0.0]),
    (
        "south-west",
        [
            -std::f32::consts::FRAC_1_SQRT_2,
            std::f32::consts::FRAC_1_SQRT_2,
        ],
    ),
    ("south", [0.0, 1.0]),
    (
        "south-east",
        [
            std::f32::consts::FRAC_1_SQRT_2,
            std::f32::consts::FRAC_1_SQRT_2,
        ],
    ),
];

/// Shapes.
pub const SHAPES: [&str; 2] = ["square", "disc"];

/// Background value of every channel.
const BACKGROUND: f32 = -1.0;

/// What a synthetic clip shows; its caption encodes exactly this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scene {
    /// Index into [`COLOURS`].
    pub colour: usize,
    /// Index into [`DIRECTIONS`] (the initial direction).
    pub direction: usize,
    /// Index into [`SHAPES`].
    pub shape: usize,
}

impl Scene {
    /// `red disc moving north-east`.
    pub fn describe(&self) -> String {
        format!(
            "{} {} moving {}",
            COLOURS[self.colour].0, SHAPES[self.shape], DIRECTIONS[self.direction].0
        )
    }
}

/// The built-in dataset: unbounded, clip `i` drawn from `(seed, i)`.
#[derive(Debug, Clone)]
pub struct SyntheticVideos {
    shape: ClipShape,
    seed: u64,
    colour_vectors: Vec<Vec<f32>>,
    direction_vectors: Vec<Vec<f32>>,
    shape_vectors: Vec<Vec<f32>>,
}

impl SyntheticVideos {
    /// Videos and captions of `shape`, from `seed`. Frames must be at least 4 pixels on
    /// each side.
    pub fn new(shape: ClipShape, seed: u64) -> Result<Self, DataError> {
        if shape.height < 4 || shape.width < 4 || shape.frames == 0 || shape.channels == 0 {
            return Err(DataError::Unsupported(format!(
                "synthetic videos need frames of at least 4x4 pixels, at least one frame and \
                 one channel; asked for {shape:?}"
            )));
        }
        if shape.caption_tokens == 0 || shape.caption_channels == 0 {
            return Err(DataError::Unsupported(
                "synthetic captions need at least one token of at least one channel".into(),
            ));
        }
        let vectors = |kind: &str, count: usize| -> Vec<Vec<f32>> {
            (0..count)
                .map(|k| {
                    let mut rng = rng_for(VOCABULARY_SEED, &format!("caption/{kind}/{k}"));
                    normal_values(&mut rng, shape.caption_channels)
                })
                .collect()
        };
        Ok(Self {
            shape,
            seed,
            colour_vectors: vectors("colour", COLOURS.len()),
            direction_vectors: vectors("direction", DIRECTIONS.len()),
            shape_vectors: vectors("shape", SHAPES.len()),
        })
    }

    /// The scene of clip `index`, and where the shape starts: (scene, centre (x, y),
    /// half-size in pixels, speed in pixels per frame).
    fn draw(&self, index: usize) -> (Scene, [f32; 2], f32, f32) {
        let mut rng = rng_for(self.seed, &format!("synthetic/{index}"));
        let scene = Scene {
            colour: rng.random_range(0..COLOURS.len()),
            direction: rng.random_range(0..DIRECTIONS.len()),
            shape: rng.random_range(0..SHAPES.len()),
        };
        let side = self.shape.height.min(self.shape.width) as f32;
        let radius = rng.random_range((side / 8.0).max(1.5)..=(side / 4.0).max(2.0));
        let x = rng.random_range(radius..=(self.shape.width as f32 - radius).max(radius));
        let y = rng.random_range(radius..=(self.shape.height as f32 - radius).max(radius));
        let speed = rng.random_range((side / 16.0)..=(side / 8.0));
        (scene, [x, y], radius, speed)
    }

    /// The scene clip `index` shows.
    pub fn scene(&self, index: usize) -> Scene {
        self.draw(index).0
    }

    /// The caption embedding `(L, caption_channels)` of a scene.
    pub fn caption(&self, scene: &Scene) -> Vec<f32> {
        let ClipShape {
            caption_tokens,
            caption_channels,
            ..
        } = self.shape;
        let mut caption = vec![0f32; caption_tokens * caption_channels];
        let attributes = [
            &self.colour_vectors[scene.colour],
            &self.direction_vectors[scene.direction],
            &self.shape_vectors[scene.shape],
        ];
        for (slot, vector) in attributes.iter().enumerate() {
            let token = slot % caption_tokens;
            let row = &mut caption[token * caption_channels..(token + 1) * caption_channels];
            for (value, v) in row.iter_mut().zip(vector.iter()) {
                *value += v;
            }
        }
        caption
    }

    /// The video `(C, F, H, W)` of clip `index`.
    fn render(&self, scene: &Scene, centre: [f32; 2], radius: f32, speed: f32) -> Vec<f32> {
        let ClipShape {
            channels,
            frames,
            height,
            width,
            ..
        } = self.shape;
        let [dx, dy] = DIRECTIONS[scene.direction].1;
        let mut velocity = [dx * speed, dy * speed];
        let mut position = centre;
        let limits = [width as f32, height as f32];
        let mut video = vec![BACKGROUND; channels * frames * height * width];
        let colour = COLOURS[scene.colour].1;
        for frame in 0..frames {
            if frame > 0 {
                for axis in 0..2 {
                    position[axis] += velocity[axis];
                    // Bounce: reflect the centre off the walls the shape touches.
                    let (lo, hi) = (radius, (limits[axis] - radius).max(radius));
                    if position[axis] < lo {
                        position[axis] = (2.0 * lo - position[axis]).min(hi);
                        velocity[axis] = -velocity[axis];
                    } else if position[axis] > hi {
                        position[axis] = (2.0 * hi - position[axis]).max(lo);
                        velocity[axis] = -velocity[axis];
                    }
                }
            }
            for row in 0..height {
                for col in 0..width {
                    let ox = col as f32 + 0.5 - position[0];
                    let oy = row as f32 + 0.5 - position[1];
                    let inside = match SHAPES[scene.shape] {
                        "disc" => ox * ox + oy * oy <= radius * radius,
                        _ => ox.abs() <= radius && oy.abs() <= radius,
                    };
                    if inside {
                        for c in 0..channels {
                            video[((c * frames + frame) * height + row) * width + col] =
                                colour[c % 3];
                        }
                    }
                }
            }
        }
        video
    }
}

impl Dataset for SyntheticVideos {
    fn len(&self) -> Option<usize> {
        None
    }

    fn shape(&self) -> ClipShape {
        self.shape
    }

    fn clip(&self, index: usize) -> Result<Clip, DataError> {
        let (scene, centre, radius, speed) = self.draw(index);
        Ok(Clip {
            video: self.render(&scene, centre, radius, speed),
            caption: self.caption(&scene),
            mask: None,
            label: format!("synthetic #{index} ({})", scene.describe()),
        })
    }

    fn describe(&self) -> String {
        let s = self.shape;
        format!(
            "built-in synthetic videos (bouncing shapes): {} channels, {} frames of {}x{}, \
             captions of {} tokens x {}",
            s.channels, s.frames, s.height, s.width, s.caption_tokens, s.caption_channels
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> ClipShape {
        ClipShape {
            channels: 3,
            frames: 8,
            height: 16,
            width: 16,
            caption_tokens: 4,
            caption_channels: 16,
        }
    }

    #[test]
    fn clips_are_deterministic_in_range_and_moving() {
        let data = SyntheticVideos::new(shape(), 5).unwrap();
        let a = data.clip(7).unwrap();
        assert_eq!(
            a,
            SyntheticVideos::new(shape(), 5).unwrap().clip(7).unwrap()
        );
        assert_ne!(a.video, data.clip(8).unwrap().video);
        assert!(a.video.iter().all(|v| (-1.0..=1.0).contains(v)));
        assert!(a.video.contains(&1.0), "the shape is visible");
        let plane = 16 * 16;
        let frame = |f: usize| -> Vec<f32> {
            (0..3)
                .flat_map(|c| a.video[(c * 8 + f) * plane..(c * 8 + f + 1) * plane].to_vec())
                .collect()
        };
        assert_ne!(frame(0), frame(1), "it moves");
    }

    #[test]
    fn captions_encode_colour_direction_and_shape() {
        let data = SyntheticVideos::new(shape(), 0).unwrap();
        let scene = Scene {
            colour: 1,
            direction: 2,
            shape: 0,
        };
        let caption = data.caption(&scene);
        assert_eq!(caption.len(), 4 * 16);
        assert_eq!(&caption[..16], data.colour_vectors[1].as_slice());
        assert_eq!(&caption[16..32], data.direction_vectors[2].as_slice());
        assert!(caption[48..].iter().all(|&v| v == 0.0));
        // Captions do not depend on the run's seed.
        assert_eq!(
            caption,
            SyntheticVideos::new(shape(), 9).unwrap().caption(&scene)
        );
    }
}
